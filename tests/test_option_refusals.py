"""Options that would do nothing are refused by name; a preset refuses any option the user set otherwise, even at its
default; sam_rho must be finite."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from hf_lwsam import LWSAMConfig
from hf_lwsam.cli.args import parse_args


@pytest.mark.parametrize("option, value, mode", [
    ("sam_top_k", 3, "sam_selection='probe'"),
    ("sam_top_ratio", 0.5, "sam_selection='probe'"),
    ("sam_probe_interval", 10, "sam_selection='probe'"),
    ("sam_probe_batches", 2, "sam_selection='probe'"),
    ("sam_probe_metric", "grad_norm", "sam_selection='probe'"),
    ("sam_probe_granularity", "layer", "sam_selection='probe'"),
    ("sam_looksam_alpha", 0.3, "sam_interval_reuse='looksam'"),
    ("sam_sync_perturbation", True, "sam_ascent='exact'"),
])
def test_an_option_of_a_mode_that_is_off_is_refused(option, value, mode, tmp_path):
    extra = dict(sam_ascent="stale") if option == "sam_sync_perturbation" else {}
    with pytest.raises(ValueError, match=rf"{option}={value!r} does nothing without {mode}"):
        LWSAMConfig(output_dir=str(tmp_path), **{option: value}, **extra)


def test_the_same_options_are_accepted_with_their_mode(tmp_path):
    LWSAMConfig(output_dir=str(tmp_path), sam_selection="probe", sam_top_k=3, sam_probe_metric="grad_norm")
    LWSAMConfig(output_dir=str(tmp_path), sam_interval=2, sam_interval_reuse="looksam", sam_looksam_alpha=0.3)
    LWSAMConfig(output_dir=str(tmp_path), sam_sync_perturbation=True)


@pytest.mark.parametrize("rho", [float("inf"), float("-inf"), float("nan")])
def test_sam_rho_must_be_finite(rho, tmp_path):
    with pytest.raises(ValueError, match="sam_rho=.* is invalid: the perturbation radius must be >= 0 and finite"):
        LWSAMConfig(output_dir=str(tmp_path), sam_rho=rho)


def test_a_preset_refuses_an_option_given_at_its_default(tmp_path):
    with pytest.raises(ValueError, match=r"sam_preset='fast' sets sam_start=0.8, but sam_start=0 was given"):
        LWSAMConfig(output_dir=str(tmp_path), sam_preset="fast", sam_start=0)
    with pytest.raises(ValueError, match=r"sam_preset='exact' sets sam_selection='all', but sam_selection='pattern'"):
        LWSAMConfig(output_dir=str(tmp_path), sam_preset="exact", sam_selection="pattern")
    config = LWSAMConfig(output_dir=str(tmp_path), sam_preset="fast", sam_start=0.8)  # the same value: fine
    assert (config.sam_selection, config.sam_start) == ("all", 0.8)


def test_a_parser_refuses_a_default_that_conflicts_with_the_preset(tmp_path):
    """HfArgumentParser passes every option: an unset one arrives as `None`, so a flag given at its default is told
    apart from one left out, without the parser saying which flags were given."""
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--sam_preset", "fast", "--sam_start", "0"]
    with pytest.raises(ValueError, match=r"sam_start=0(\.0)? was given"):
        HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(argv)
    (config,) = HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(argv[:-2])
    assert config.sam_start == 0.8


def test_the_cli_refuses_a_preset_with_a_conflicting_default(tmp_path, capsys):
    from hf_lwsam.cli.args import UsageError

    with pytest.raises(UsageError, match=r"sam_start=0(\.0)? was given"):
        parse_args(["--output_dir", str(tmp_path), "--sam_preset", "fast", "--sam_start", "0"])
    *_, train_args, _ = parse_args(["--output_dir", str(tmp_path), "--sam_preset", "fast"])
    assert (train_args.sam_selection, train_args.sam_start) == ("all", 0.8)


def test_sam_interval_help_states_the_rule_with_sam_start():
    help_text = LWSAMConfig.__dataclass_fields__["sam_interval"].metadata["help"]
    assert "sam_start" in help_text and "(s - start)" in help_text
