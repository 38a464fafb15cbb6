"""The study statistics (scripts/study_stats.py) against independent computations."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
from scipy import stats

_spec = importlib.util.spec_from_file_location("study_stats", Path(__file__).resolve().parents[1] / "scripts" /
                                               "study_stats.py")
study_stats = sys.modules["study_stats"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(study_stats)

# digits-noise40, seeds 0-2 (the robustness study's table): AdamW, full SAM, normalization layers only.
ADAMW, FULL, NORM = [0.818, 0.778, 0.812], [0.890, 0.786, 0.868], [0.828, 0.832, 0.822]


def test_paired_difference_equals_scipy_one_sample_t_interval():
    d = study_stats.paired_difference(ADAMW, FULL)
    ref = stats.ttest_1samp([f - a for a, f in zip(ADAMW, FULL)], 0.0).confidence_interval(0.95)
    assert d.n == 3 and d.mean == pytest.approx((0.072 + 0.008 + 0.056) / 3)
    assert (d.lo, d.hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert d.excludes_zero is (ref.low > 0)
    assert d.format(100) == f"{d.mean * 100:+.2f} [{ref.low * 100:+.2f}, {ref.high * 100:+.2f}]"


def test_one_seed_has_no_interval_and_unpaired_input_is_refused():
    d = study_stats.paired_difference([0.5], [0.6])
    assert math.isnan(d.lo) and not d.excludes_zero and d.format(100) == "+10.00 [n=1]"
    with pytest.raises(ValueError, match="one value per seed"):
        study_stats.paired_difference([0.5, 0.6], [0.6])


def test_gain_fraction_of_an_exact_half_is_half_on_every_resample():
    other = [a + 0.5 * (f - a) for a, f in zip(ADAMW, FULL)]
    g = study_stats.gain_fraction(ADAMW, FULL, other, resamples=500)
    assert (g.mean, g.lo, g.hi) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))


def test_gain_fraction_matches_a_direct_bootstrap_of_the_ratio_of_means():
    g = study_stats.gain_fraction(ADAMW, FULL, NORM, resamples=4000, seed=1)
    d_full = [f - a for a, f in zip(ADAMW, FULL)]
    d_norm = [o - a for a, o in zip(ADAMW, NORM)]
    assert g.mean == pytest.approx(sum(d_norm) / sum(d_full))
    # Every resample of 3 seeds is one of 10 multisets: the ratio's range is bounded by them.
    ratios = [sum(d_norm[i] for i in c) / sum(d_full[i] for i in c)
              for c in itertools.combinations_with_replacement(range(3), 3)]
    assert min(ratios) <= g.lo <= g.mean <= g.hi <= max(ratios)


def test_gain_fraction_is_unbounded_when_full_sam_does_not_gain():
    g = study_stats.gain_fraction(ADAMW, [a - 0.01 for a in ADAMW], NORM, resamples=200)
    assert math.isnan(g.mean) and g.lo == -math.inf and g.hi == math.inf
