"""One name and one description per SAM mode, derived from the `sam_*` options.

The model card, the command-line tools' end-of-run summary and the docs call a mode by [`sam_mode`], so a run is
named the same everywhere: `full SAM every step` (`sam_preset="exact"`), `full SAM, last 20% of the run` (`"fast"`),
`Momentum-SAM on every parameter` (`"free"`), `layer-wise SAM on the output side` (the defaults), ...
"""

from __future__ import annotations

from typing import Any

from .config import LWSAMConfig
from .selection_rules import SELECTION_RULES

# The preset that README.md, docs/index.md, docs/guides/choosing-a-mode.md and both CLIs' --help recommend: it kept
# all of full SAM's gain at one pass per step in the momentum study (docs/studies/momentum.md).
RECOMMENDED_PRESET = "free"


def _schedule(args: Any) -> str:
    """Which optimizer steps are SAM steps, as a suffix of the mode's name ('' for every step)."""
    parts = []
    start = args.sam_start
    if start and start < 1:
        parts.append(f"last {round((1 - start) * 100, 6):g}% of the run")
    elif start:
        parts.append(f"from step {int(start)}")
    if args.sam_interval > 1:
        looksam = args.sam_interval_reuse == "looksam"
        parts.append(f"k={args.sam_interval}" if looksam else f"every {args.sam_interval} steps")
    return "".join(f", {part}" for part in parts)


def sam_mode(args: Any) -> str:
    """The name of the mode that `args` (an [`LWSAMConfig`] or anything with its `sam_*` attributes) trains with:
    `full SAM every step`, `full SAM, last 20% of the run`, `Momentum-SAM on every parameter`,
    `layer-wise SAM on the output side`, `layer-wise SAM on the selected layers, stale ascent`,
    `full random perturbation`, `full LookSAM, k=5`, ... The same options give the same name."""
    looksam = args.sam_interval_reuse == "looksam" and args.sam_interval > 1
    word = "LookSAM" if looksam else "SAM"
    if args.sam_adaptive:
        word = "ASAM" if word == "SAM" else f"{word} (ASAM)"
    method = {"momentum": "Momentum-SAM", "random": "random perturbation"}.get(args.sam_ascent, word)
    stale = ", stale ascent" if args.sam_ascent == "stale" else ""
    schedule = _schedule(args)
    rule = SELECTION_RULES[args.sam_selection]
    if rule.layer_wise:
        return f"layer-wise {method} {rule.where(args)}{stale}{schedule}"
    exclude = args.sam_exclude_layers
    excluded = "" if exclude is None else f", excluding {exclude if isinstance(exclude, str) else ' '.join(exclude)}"
    if args.sam_ascent == "momentum":
        return f"Momentum-SAM on every parameter{schedule}{excluded}"
    if not schedule and args.sam_ascent == "exact":
        schedule = " every step"  # told apart from its late phases
    return f"full {method}{stale}{schedule}{excluded}"


def preset_options(preset: str | None, **options: Any) -> LWSAMConfig:
    """The config of `sam_preset=preset` (`None`: no preset) with the `sam_*` `options`, every other option resolved
    as a run resolves it (e.g. `preset_options("free").sam_rho` is the preset's radius)."""
    return LWSAMConfig(output_dir="unused", report_to="none", sam_preset=preset, **options)


def preset_mode(preset: str) -> str:
    """The name ([`sam_mode`]) of the mode a preset sets, e.g. `preset_mode("free")`."""
    return sam_mode(preset_options(preset))


def _perturbation(args: Any, moment: str | None = None) -> str:
    if args.sam_ascent == "momentum":
        given = getattr(args, "sam_momentum", None)
        if (moment or given) == "own":
            beta = getattr(args, "sam_momentum_beta", None)
            beta = 0.9 if beta is None else beta
            m = (f"an average of the gradients of S kept by hf_lwsam, m <- {beta:g} m + {1 - beta:g} g at each "
                 "optimizer step" + ("" if given else " (the optimizer keeps no first moment it reads)"))
        else:
            m = "the optimizer's first moment"
        return (f"e_S = -rho * m_S / ||m_S||, m {m} after the previous step (Momentum-SAM; the first step, with no "
                "moment yet, is a plain step): one forward and one backward per micro-batch, at w + e_S")
    if args.sam_ascent == "random":
        return ("e_S is Gaussian noise scaled per weight row by the row's norm, radius rho: one forward and one "
                "backward per micro-batch, at w + e_S, no ascent gradient")
    g = "|w|^2 g_S / || |w| g_S ||" if args.sam_adaptive else "g_S / ||g_S||"
    if args.sam_ascent == "stale":
        return (f"e_S = rho * {g}, g_S the gradient of S kept from the previous SAM step (a stale ascent): one "
                "forward and one backward per micro-batch, at w + e_S")
    return (f"e_S = rho * {g}, g_S the gradient of S at w on the same micro-batch: an ascent pass, then one forward "
            "and one backward at w + e_S (two passes per micro-batch)")


def _steps(args: Any) -> str:
    start, interval = args.sam_start, args.sam_interval
    if not start and interval == 1:
        return "Every optimizer step is a SAM step"
    steps = f"one optimizer step in {interval}" if interval > 1 else "the optimizer steps"
    if start and start < 1:
        steps += f" of the last {round((1 - start) * 100, 6):g}% of the run"
    elif start:
        steps += f" from step {int(start)} on"
    other = "the stock optimizer step"
    if args.sam_interval_reuse == "looksam" and interval > 1:
        other = ("the stock step plus the last SAM gradient's component orthogonal to the clean gradient, weighted by "
                 f"alpha={args.sam_looksam_alpha} (LookSAM)")
    return f"SAM steps are {steps}; the others are {other}"


def mode_description(args: Any, moment: str | None = None) -> str:
    """What a run with `args` did, in two sentences (Markdown): the parameters S it perturbs, where the perturbation
    e_S comes from, what a step costs and which steps are SAM steps. `moment`: where the momentum ascent's m came from
    (`"optimizer"` or `"own"`, as the trainer decided it; default: `sam_momentum`)."""
    who = SELECTION_RULES[args.sam_selection].perturbs(args)
    return (f"S is {who}; {_perturbation(args, moment)}. S is then restored bit-exactly and the stock optimizer "
            f"steps at w with the gradient taken at w + e_S. {_steps(args)}.")
