"""`LWSAMConfig`: `TrainingArguments` plus the `sam_*` options of layer-wise SAM."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import textwrap
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from transformers import TrainingArguments
from transformers.utils.generic import strtobool

from .ascent import ASCENTS, ascent_help, declared_options
from .probe import GRANULARITIES, METRICS
from .selection_rules import SELECTION_RULES, selection_help, selection_rule

INTERVAL_REUSE_MODES = ("none", "looksam")
PROBE_METRICS, PROBE_GRANULARITIES = METRICS, GRANULARITIES  # the probe's own: one definition
# What the options a preset or a mode can set resolve to when left unset (`None`) and no preset sets them. Their
# fields default to `None`, so every way a config is built (keywords, HfArgumentParser, `dataclasses.replace`, the
# copy into TRL's config classes) tells an option the user set, even at this value, from one left unset.
SAM_DEFAULTS: dict[str, Any] = {"sam_rho": 0.05, "sam_selection": "pattern", "sam_ascent": "exact", "sam_interval": 1,
                                "sam_start": 0}
# `sam_preset`: several options at once, chosen from the robustness study (docs/studies/which-mode.md). Each preset
# sets every option that defines it; any of them may also be given, at the preset's value only.
_FULL_SAM = {"sam_selection": "all", "sam_ascent": "exact", "sam_interval": 1, "sam_start": 0}
SAM_PRESETS: dict[str, dict[str, Any]] = {
    "exact": {**_FULL_SAM},  # SAM (Foret et al.): every trainable parameter, every step, two passes
    "fast": {**_FULL_SAM, "sam_start": 0.8},  # the same SAM over the last 20% of the run only
    # Momentum-SAM on every parameter: one pass per step, e from the optimizer's first moment
    "free": {"sam_selection": "all", "sam_ascent": "momentum"},
}
# What a preset suggests where the user set nothing: the radius its study chose on validation (both digits tasks).
SAM_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {"free": {"sam_rho": 0.2}}

# Optimizers that step inside backward hooks: there is no `.grad` left for a second pass to fill.
_UNSUPPORTED_OPTIMIZERS = (
    "lomo",
    "adalomo",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
    "apollo_adamw_layerwise",
)


def _deepspeed_zero_stage(deepspeed: dict | str | None) -> int:
    """The ZeRO stage of a DeepSpeed config given as a dict, a JSON string or a JSON file path (0 if none). A config
    that cannot be read, or whose `zero_optimization` is not a mapping, is a `ValueError` naming `deepspeed`."""
    if not deepspeed:
        return 0
    config: Any = deepspeed
    if isinstance(deepspeed, str):
        is_file = os.path.isfile(deepspeed)
        try:
            if is_file:
                with open(deepspeed, encoding="utf-8") as f:
                    config = json.load(f)
            else:
                config = json.loads(deepspeed)
        except (OSError, ValueError) as e:  # an unreadable file, bad UTF-8, bad JSON
            cause = f"is not a valid JSON file ({e})" if is_file else "is neither an existing file nor a JSON object"
            raise ValueError(f"deepspeed={deepspeed!r} {cause}: pass the path of a DeepSpeed JSON config file, its "
                             "JSON text or a dict.") from None
    if not isinstance(config, dict):
        raise ValueError(f"deepspeed={deepspeed!r} holds a {type(config).__name__}, not a JSON object: pass a "
                         "DeepSpeed config such as {\"zero_optimization\": {\"stage\": 1}}.")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"deepspeed: zero_optimization is {zero!r} ({type(zero).__name__}), not a mapping: write it "
                         "as {\"zero_optimization\": {\"stage\": N}} in the DeepSpeed config.")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not (isinstance(stage, int) or (isinstance(stage, str) and stage.isdigit())):
        raise ValueError(f"deepspeed: zero_optimization.stage is {stage!r}: use an integer 0-3 in the DeepSpeed "
                         "config.")
    return int(stage)


def _fsdp_version(fsdp_config: dict | str | None) -> int:
    """The FSDP version of a Trainer `fsdp_config` (a dict, a JSON string or a JSON file); transformers' default is
    2."""
    config: Any = fsdp_config or {}
    if isinstance(config, str):
        try:
            if os.path.isfile(config):
                with open(config, encoding="utf-8") as f:
                    config = json.load(f)
            else:
                config = json.loads(config)
        except (OSError, json.JSONDecodeError):
            return 2  # let transformers report an unreadable config
    if not isinstance(config, dict):
        return 2
    value = config.get("version", config.get("fsdp_version", 2))
    return int(value) if str(value).isdigit() else 2


def fsdp_version(args: Any) -> int | None:
    """The FSDP version the Trainer will shard with under `args`, `None` without FSDP. `args.fsdp` wins (the version
    of its `fsdp_config`, transformers' default 2); without it, what `accelerate config` / `accelerate launch` set in
    the environment: the Accelerator builds `FullyShardedDataParallelPlugin()` when ACCELERATE_USE_FSDP is true, which
    reads FSDP_VERSION (default 1). The same plugin is built here to read it."""
    if args.fsdp:
        return _fsdp_version(args.fsdp_config)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # the Accelerator's own test
        from accelerate.utils import FullyShardedDataParallelPlugin

        return int(FullyShardedDataParallelPlugin().fsdp_version)
    return None


def deepspeed_stage(args: Any) -> int | None:
    """The DeepSpeed ZeRO stage the Trainer will run under `args`, `None` without DeepSpeed. `args.deepspeed` wins;
    without it, TrainingArguments builds accelerate's `DeepSpeedPlugin()` when ACCELERATE_USE_DEEPSPEED is true (as
    `accelerate launch` sets it), whose stage comes from ACCELERATE_DEEPSPEED_CONFIG_FILE or
    ACCELERATE_DEEPSPEED_ZERO_STAGE (default 2). The same plugin is built here to read it."""
    if args.deepspeed:
        return _deepspeed_zero_stage(args.deepspeed)
    if strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):  # TrainingArguments' own test
        from accelerate.utils import DeepSpeedPlugin

        return int(DeepSpeedPlugin().zero_stage)
    return None


def launch_source(args: Any, backend: str) -> str:
    """Where `backend` ("fsdp" or "deepspeed") comes from, for a message: the option, or the launch environment."""
    if backend == "fsdp":
        if args.fsdp:
            return f"fsdp={args.fsdp!r}"
        version = os.environ.get("FSDP_VERSION", "(unset: 1)")
        return f"ACCELERATE_USE_FSDP=true, FSDP_VERSION={version} from accelerate launch"
    if args.deepspeed:
        return f"deepspeed={args.deepspeed!r}"
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    where = (f"ACCELERATE_DEEPSPEED_CONFIG_FILE={config}" if config and config != "none" else
             f"ACCELERATE_DEEPSPEED_ZERO_STAGE={os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '(unset: 2)')}")
    return f"ACCELERATE_USE_DEEPSPEED=true, {where} from accelerate launch"


@dataclass
class LWSAMConfigMixin:
    r"""
    The `sam_*` options of layer-wise sharpness-aware minimization and their validation, as a dataclass mixin: put it
    first among the bases of any [`~transformers.TrainingArguments`] subclass (or use [`lwsam_config`]) and that class
    keeps its own fields and defaults. [`LWSAMConfig`] is this mixin plus `TrainingArguments`; the options are
    documented there.
    """

    sam_preset: str | None = field(
        default=None,
        metadata={
            "help": "Several sam_* options at once: 'exact' = full SAM every step, two passes (sam_selection='all', "
            "sam_ascent='exact', sam_interval=1, sam_start=0); 'fast' = the same over the last 20 percent of the run "
            "only (sam_start=0.8); 'free' = Momentum-SAM on every parameter, one pass per step (sam_selection='all', "
            "sam_ascent='momentum', and sam_rho=0.2 unless given). An option the preset sets may be given too only "
            "with the same value.",
            "choices": list(SAM_PRESETS),
        },
    )
    sam_rho: float | None = field(
        default=None,
        metadata={"help": "SAM perturbation radius rho (>= 0): the ascent step is rho * g_S / ||g_S||. Default 0.05; "
                          "0.2 under sam_preset='free'. 0 trains exactly as the stock Trainer, at the cost of the "
                          "mode's passes."},
    )
    sam_selection: str | None = field(
        default=None,
        # the registry's rules (`hf_lwsam.selection_rules`); `choices` is the live view, so argparse also accepts a
        # rule registered before the arguments are parsed
        metadata={"help": selection_help(), "choices": SELECTION_RULES.keys()},
    )
    sam_target_layers: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules to perturb, PEFT target_modules semantics: one value is a regex matched with "
            "re.fullmatch against module names; several values match a name exactly or as a dotted suffix. "
            "Default: the last trunk block + final norm + task head (untied). Refused under sam_selection='all' "
            "(every preset), which perturbs every trainable parameter: use sam_selection='pattern'.",
            "nargs": "+",
        },
    )
    sam_exclude_layers: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to leave unperturbed, same matching rules as --sam_target_layers; under "
                          "sam_selection='all', every trainable parameter but these modules' is perturbed.",
                  "nargs": "+"},
    )
    sam_adaptive: bool = field(
        default=False,
        metadata={"help": "Use ASAM's scale-invariant perturbation rho * |w|^2 g / || |w| g || over the selection."},
    )
    sam_reuse_activations: bool = field(
        default=True,
        metadata={
            "help": "Replay pass 1's outputs of the trunk blocks below the lowest perturbed block in pass 2 instead "
            "of recomputing them (same gradients, less compute); falls back with a logged reason when unsafe. Only "
            "the exact ascent's two passes on a selection below which layers stay unperturbed reuse, so False is "
            "refused under sam_selection='all' (every preset) and the one-pass ascents."
        },
    )
    sam_sync_perturbation: bool = field(
        default=False,
        metadata={
            "help": "All-reduce (mean) the ascent gradient across processes before normalising it (global-batch "
            "SAM). Default: each process perturbs with its own micro-batch gradient, with no communication."
        },
    )

    sam_interval: int | None = field(
        default=None,
        metadata={"help": "SAM steps are the optimizer steps s >= start with (s - start) %% sam_interval == 0, start "
                          "being the first step of sam_start; the others are exactly the stock step (1, the default: "
                          "every step from sam_start on)."},
    )
    sam_ascent: str | None = field(
        default=None,
        metadata={"help": ascent_help() + " Default 'exact'; 'momentum' under sam_preset='free'.",
                  "choices": ASCENTS.keys()},  # live: an ascent registered later is a choice too
    )
    sam_momentum: str | None = field(
        default=None,
        metadata={
            "help": "sam_ascent='momentum': where m comes from, 'optimizer' (its first moment: torch's Adam/AdamW "
            "exp_avg, SGD's momentum_buffer; other optimizers are refused) or 'own' (an average of the gradients of S "
            "kept by hf_lwsam for any optimizer, m <- beta m + (1 - beta) g at each optimizer step from m = 0: one "
            "float32 copy of S, saved with the checkpoints). Default 'optimizer'; under sam_preset='free', "
            "'optimizer' where the optimizer keeps a readable first moment and 'own' otherwise.",
            "choices": ["optimizer", "own"],
        },
    )
    sam_momentum_beta: float | None = field(
        default=None,
        metadata={"help": "sam_momentum='own': the decay beta in [0, 1) of the average (0.9, Adam's beta1, when "
                          "unset). Refused with sam_momentum='optimizer'."},
    )
    sam_interval_reuse: str = field(
        default="none",
        metadata={
            "help": "What the steps between SAM steps (sam_interval >= 2) add to the stock gradient: 'none' (nothing, "
            "exactly the stock step) or 'looksam' (LookSAM: the last SAM gradient's component orthogonal to the "
            "clean gradient, rescaled to the current gradient's norm and weighted by sam_looksam_alpha).",
            "choices": list(INTERVAL_REUSE_MODES),
        },
    )
    sam_looksam_alpha: float = field(
        default=0.7,
        metadata={"help": "sam_interval_reuse='looksam': weight alpha (>= 0) of the kept component g_v; the step adds "
                          "alpha * ||g|| / ||g_v|| * g_v to the gradient g (the paper's default: 0.7)."},
    )
    sam_start: float | None = field(
        default=None,
        metadata={"help": "Late-phase SAM: the first optimizer step that may be a SAM step; an integer step (e.g. "
                          "100) or a fraction in [0, 1) of the run's total optimizer steps (e.g. 0.7: the last 30 "
                          "percent). Steps before it are exactly the stock step; sam_interval counts from it. Default "
                          "0; 0.8 under sam_preset='fast'."},
    )
    sam_top_k: int = field(
        default=2,
        metadata={"help": "sam_selection='probe': how many candidates (highest scores) to perturb (>= 1)."},
    )
    sam_top_ratio: float | None = field(
        default=None,
        metadata={
            "help": "sam_selection='probe': perturb ceil(ratio * number of candidates) candidates (layers, or blocks "
            "under sam_probe_granularity='block'), 0 < ratio <= 1. Wins over --sam_top_k when set."
        },
    )
    sam_probe_interval: int = field(
        default=100,
        metadata={"help": "sam_selection='probe': optimizer steps between probes; 0 probes once, at the start."},
    )
    sam_probe_batches: int = field(
        default=1,
        metadata={
            "help": "sam_selection='probe': micro-batches whose gradients a probe uses, at least (a probe reads whole "
            "accumulation windows: ceil(batches / gradient_accumulation_steps) optimizer steps)."
        },
    )
    sam_probe_metric: str = field(
        default="grad_norm_per_cost",
        metadata={
            "help": "sam_selection='probe': ranking score, 'grad_norm' (L2 norm of the candidate's gradient), "
            "'grad_norm_per_param' (that norm / sqrt(number of its parameters)) or 'grad_norm_per_cost' "
            "(that norm / the share of the model's compute that perturbing it recomputes).",
            "choices": list(PROBE_METRICS),
        },
    )
    sam_probe_granularity: str = field(
        default="block",
        metadata={
            "help": "sam_selection='probe': what a candidate is, 'block' (each transformer block as one candidate, "
            "plus each layer after the trunk; embeddings left out unless named by sam_target_layers) or 'layer' (every "
            "module owning trainable parameters).",
            "choices": list(PROBE_GRANULARITIES),
        },
    )

    def __getstate__(self) -> dict[str, Any]:
        # Never pickled with the Hub token: the Trainer writes `torch.save(args)` into every checkpoint, the final
        # folder and each checkpoint push (training_args.bin). Hub calls read it from the live config, or from
        # `hf auth login` / HF_TOKEN.
        state = dict(self.__dict__)
        if state.get("hub_token") is not None:
            state["hub_token"] = None
        return state

    def __post_init__(self):
        # As in TRL's ModelConfig: a single command-line value is a regex, several are names.
        for name in ("sam_target_layers", "sam_exclude_layers"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
                setattr(self, name, value[0])
        # Before the stock checks, so an unsupported setup (FSDP, ZeRO-2/3) is refused with our message.
        self._validate_sam()
        super().__post_init__()
        self._refuse_reentrant_checkpointing()  # after the stock gradient_* -> activation_* aliasing

    def _resolve_options(self) -> None:
        """Set the options left unset (`None`): from `sam_preset`, else from `SAM_DEFAULTS`. An option the preset sets
        that was given at another value is an error (its default included: nothing is overridden silently); one given
        at the preset's value is kept, so a config rebuilt from a resolved one (`dataclasses.replace`, the copy into
        TRL's config classes) resolves the same way."""
        preset = self.sam_preset
        if preset is not None and preset not in SAM_PRESETS:
            raise ValueError(f"sam_preset={preset!r} is unknown: use one of {', '.join(map(repr, SAM_PRESETS))}, or "
                             "leave it unset.")
        for name, value in SAM_PRESETS.get(preset, {}).items():
            given = getattr(self, name)
            if given is not None and (isinstance(given, bool) or given != value):
                raise ValueError(f"sam_preset={preset!r} sets {name}={value!r}, but {name}={given!r} was given: drop "
                                 "one of the two (or set the options without a preset).")
            setattr(self, name, value)
        for name, value in {**SAM_DEFAULTS, **SAM_PRESET_DEFAULTS.get(preset, {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _refuse_unused_options(self) -> None:
        """An option that does nothing in the chosen mode is refused by name: one of a mode that is off, set off its
        default; what the selection rule refuses (`SelectionRule.validate`: layer patterns and
        sam_reuse_activations=False under sam_selection='all'); sam_reuse_activations=False where nothing is reused."""
        defaults = _sam_defaults()
        rule = SELECTION_RULES[self.sam_selection]
        needs: dict[str, tuple[str, bool]] = {}
        for other in SELECTION_RULES.values():  # the options only a selection rule reads (the probe's)
            for name in other.options:
                mode, on = needs.get(name, ("", False))
                needs[name] = (f"{mode} or {other.name!r}" if mode else f"sam_selection={other.name!r}",
                               on or other is rule)
        needs["sam_looksam_alpha"] = ("sam_interval_reuse='looksam'", self.sam_interval_reuse == "looksam")
        ascent = ASCENTS[self.sam_ascent]
        for name, users in declared_options().items():  # the options the ascents declare (`Ascent.options`)
            if name != "sam_reuse_activations":  # below, after sam_selection='all'
                needs[name] = (_ascent_mode(users), name in ascent.options)
        for name, (mode, on) in needs.items():
            value = getattr(self, name)
            if not on and value != defaults[name]:
                raise ValueError(f"{name}={value!r} does nothing without {mode}: set that mode, or drop {name}.")
        rule.validate(self)
        if self.sam_reuse_activations is False:
            if "sam_reuse_activations" not in ascent.options:
                why = ("a one-pass ascent has no first pass to reuse" if not ascent.clean_gradient else
                       "the ascent does not declare it among its options (it reuses no activations)")
                raise ValueError(f"sam_reuse_activations=False does nothing with sam_ascent={self.sam_ascent!r}: "
                                 f"{why}. Drop sam_reuse_activations.")

    def _validate_sam(self) -> None:
        self._resolve_options()
        rho = self.sam_rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"sam_rho={rho!r} is invalid: the perturbation radius must be >= 0 and finite "
                             "(e.g. 0.05).")
        selection_rule(self.sam_selection)  # a registered rule (the live registry), else a ValueError listing them
        self._validate_probe()
        if isinstance(self.sam_interval, bool) or not isinstance(self.sam_interval, int) or self.sam_interval < 1:
            raise ValueError(f"sam_interval={self.sam_interval!r} is invalid: use an integer >= 1 (SAM every "
                             "sam_interval optimizer steps; 1 = every step).")
        if self.sam_ascent not in ASCENTS:  # the live registry: an ascent registered before the config is built
            raise ValueError(f"sam_ascent={self.sam_ascent!r} is unknown: use one of "
                             f"{', '.join(map(repr, ASCENTS))}, or register it first (hf_lwsam.register_ascent).")
        self._validate_schedule()
        self._refuse_unused_options()
        for name in ("sam_target_layers", "sam_exclude_layers"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value)
            ):
                raise ValueError(
                    f"{name}={value!r} is invalid: pass a regex string or a non-empty list of module names."
                )
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(
                        f"{name}={value!r} is not a valid regular expression ({e}): pass a regex such as "
                        f"'.*layer\\.5.*', or several module names."
                    ) from None
        self._refuse_unsupported_setups()

    def _validate_schedule(self) -> None:
        """`sam_interval_reuse`, `sam_looksam_alpha`, `sam_start` and the combinations of the ascent schedules."""
        if self.sam_interval_reuse not in INTERVAL_REUSE_MODES:
            raise ValueError(f"sam_interval_reuse={self.sam_interval_reuse!r} is unknown: use one of "
                             f"{', '.join(map(repr, INTERVAL_REUSE_MODES))}.")
        alpha = self.sam_looksam_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"sam_looksam_alpha={alpha!r} is invalid: use a finite weight >= 0 (the paper's 0.7).")
        if self.sam_interval_reuse == "looksam" and self.sam_interval < 2:
            raise ValueError(f"sam_interval_reuse='looksam' with sam_interval={self.sam_interval} is meaningless: "
                             "every step is a SAM step, so there is no step between to reuse on. Set "
                             "sam_interval >= 2 (the paper's k, e.g. 5).")
        ASCENTS[self.sam_ascent].validate(self)
        if self.sam_interval_reuse == "looksam" and fsdp_version(self) is not None:
            raise ValueError(f"sam_interval_reuse='looksam' is not supported with {launch_source(self, 'fsdp')}: it is "
                             "implemented for whole (unsharded) parameters. Use DDP, or sam_ascent='exact'/'stale' "
                             "without LookSAM.")
        start = self.sam_start
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < float("inf") or (
            start >= 1 and start != int(start)
        ):
            raise ValueError(f"sam_start={start!r} is invalid: use an optimizer step (an integer >= 0, e.g. 100) or a "
                             "fraction of the run's total steps in [0, 1) (e.g. 0.7).")
        if start >= 1 or start == 0:  # a step (TrainingArguments reads logging_steps etc. the same way)
            self.sam_start = int(start)

    def _validate_probe(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not is_int(self.sam_top_k) or self.sam_top_k < 1:
            raise ValueError(
                f"sam_top_k={self.sam_top_k!r} is invalid: the number of probed layers to perturb must be an integer "
                ">= 1 (e.g. 2), or set sam_top_ratio."
            )
        ratio = self.sam_top_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(
                f"sam_top_ratio={ratio!r} is invalid: use a fraction of the candidate layers in (0, 1] (e.g. 0.1), "
                "or None to use sam_top_k."
            )
        if not is_int(self.sam_probe_interval) or self.sam_probe_interval < 0:
            raise ValueError(
                f"sam_probe_interval={self.sam_probe_interval!r} is invalid: use an integer >= 0 (optimizer steps "
                "between probes, e.g. 100; 0 probes once at the start)."
            )
        if not is_int(self.sam_probe_batches) or self.sam_probe_batches < 1:
            raise ValueError(
                f"sam_probe_batches={self.sam_probe_batches!r} is invalid: use an integer >= 1 (micro-batches per "
                "probe)."
            )
        if self.sam_probe_granularity not in PROBE_GRANULARITIES:
            raise ValueError(
                f"sam_probe_granularity={self.sam_probe_granularity!r} is unknown: use one of "
                f"{', '.join(map(repr, PROBE_GRANULARITIES))}."
            )
        if self.sam_probe_metric not in PROBE_METRICS:
            raise ValueError(
                f"sam_probe_metric={self.sam_probe_metric!r} is unknown: use one of "
                f"{', '.join(map(repr, PROBE_METRICS))}."
            )
        accumulation = max(int(self.gradient_accumulation_steps), 1)
        windows = -(-self.sam_probe_batches // accumulation)  # ceil: optimizer steps a probe spans
        if self.sam_probe_interval and windows > self.sam_probe_interval:
            raise ValueError(
                f"sam_probe_interval={self.sam_probe_interval} is shorter than one probe: sam_probe_batches="
                f"{self.sam_probe_batches} with gradient_accumulation_steps={accumulation} spans {windows} optimizer "
                f"steps. Set sam_probe_interval >= {windows} or lower sam_probe_batches."
            )

    def _refuse_unsupported_setups(self) -> None:
        supported = ("Supported: single device, DDP (torchrun / accelerate launch) and FSDP2 (fsdp_config version 2); "
                     "DeepSpeed ZeRO stage 0-1 is not refused but not tested.")
        version = fsdp_version(self)  # what accelerate will run: the options, else the `accelerate launch` environment
        if version is not None and version != 2:
            what = (f"fsdp={self.fsdp!r} with FSDP version {version}" if self.fsdp else
                    f"FSDP version {version} ({launch_source(self, 'fsdp')})")
            raise ValueError(
                f"{what} is not supported by LWSAMTrainer: FSDP1 flattens the parameters, so the selected layers "
                f"cannot be perturbed on their own. Use FSDP2: fsdp_config={{'version': 2}} (accelerate config: "
                f"fsdp_version: 2)."
            )
        stage = deepspeed_stage(self)
        if stage is not None and stage >= 2:
            raise ValueError(
                f"DeepSpeed ZeRO stage {stage} ({launch_source(self, 'deepspeed')}) is not supported by LWSAMTrainer: "
                f"ZeRO-2/3 partition gradients and parameters inside DeepSpeed's engine, out of reach of the "
                f"perturbation. {supported} Set zero_optimization.stage to 0 or 1 (accelerate config: zero_stage), or "
                "shard with FSDP2."
            )
        optim = getattr(self.optim, "value", self.optim)
        if optim in _UNSUPPORTED_OPTIMIZERS:
            raise ValueError(
                f"optim={optim!r} is not supported by LWSAMTrainer: it updates weights inside the backward pass, so "
                "the perturbed step cannot be taken. Use a standard optimizer such as optim='adamw_torch'."
            )

    def _refuse_reentrant_checkpointing(self) -> None:
        enabled = getattr(self, "activation_checkpointing", self.gradient_checkpointing)
        kwargs = getattr(self, "activation_checkpointing_kwargs", self.gradient_checkpointing_kwargs)
        if isinstance(kwargs, str):
            kwargs = json.loads(kwargs)
        if enabled and (kwargs or {}).get("use_reentrant", False):
            raise ValueError(
                "activation_checkpointing_kwargs={'use_reentrant': True} is not supported by LWSAMTrainer: reentrant "
                "checkpointing cannot back-propagate to a subset of parameters. Use "
                "{'use_reentrant': False} (the transformers default)."
            )


def sam_option_docs() -> list[dict[str, Any]]:
    """The `sam_*` options as documented everywhere (the `LWSAMConfig` docstring, the options page, the model card):
    read from the fields of [`LWSAMConfigMixin`] and their `help` metadata, in declaration order.

    Each entry has `name`, `type` (e.g. `"list[str] or str"`), `default` (what the option is when left unset and no
    preset sets it, from `SAM_DEFAULTS` for the options a preset can set; `None` when it has no default value),
    `help` (argparse's `%%` unescaped) and `choices` (or `None`).
    """
    options = []
    for f in fields(LWSAMConfigMixin):
        if not f.name.startswith("sam_"):
            continue
        kind = LWSAMConfigMixin.__annotations__.get(f.name, f.type)  # as written: HfArgumentParser rewrites f.type
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        kind = " or ".join(part.strip() for part in kind.split("|") if part.strip() != "None")
        default = f.default_factory() if f.default_factory is not MISSING else SAM_DEFAULTS.get(f.name, f.default)
        options.append({"name": f.name, "type": kind, "default": None if default is MISSING else default,
                        "help": f.metadata.get("help", "").replace("%%", "%"),
                        "choices": list(f.metadata["choices"]) if "choices" in f.metadata else None})
    return options


def _sam_parameters_docstring(indent: str = "        ") -> str:
    """The `Parameters:` entries of the `sam_*` options, HF style, from [`sam_option_docs`]."""
    lines = []
    for option in sam_option_docs():
        default = option["default"]
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        lines.append(f"{indent}{option['name']} (`{option['type']}`, *optional*"
                     f"{'' if default is None else f', defaults to `{shown}`'}):")
        text = option["help"]
        if option["choices"]:
            text += " Choices: " + ", ".join(f'`"{c}"`' for c in option["choices"]) + "."
        lines.append(textwrap.fill(text, width=120, initial_indent=indent + "    ", subsequent_indent=indent + "    "))
    return "\n".join(lines)


def _ascent_mode(users: list[str]) -> str:
    """The `sam_ascent` values `users` (and the presets that set one) as an unused-option refusal names them."""
    presets = [name for name, options in SAM_PRESETS.items() if options.get("sam_ascent") in users]
    shown = "sam_ascent=" + " or ".join(map(repr, users))
    return shown + (f" (sam_preset={' or '.join(map(repr, presets))})" if presets else "")


@functools.cache
def _sam_defaults() -> dict[str, Any]:
    """The default of every field of [`LWSAMConfigMixin`] (read once; `None` for those `SAM_DEFAULTS` resolves)."""
    return {f.name: f.default for f in fields(LWSAMConfigMixin)}


@dataclass
class LWSAMConfig(LWSAMConfigMixin, TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for [`LWSAMTrainer`]: every stock option plus the `sam_*` options of
    layer-wise sharpness-aware minimization (Lee, KDD 2024, arXiv 2503.14205). The `Parameters` below are built when
    the module is imported, from the fields' `help` metadata, the same text as the `--sam_*` flags' help.
    """


LWSAMConfig.__doc__ = f"{LWSAMConfig.__doc__.rstrip()}\n\n    Parameters:\n{_sam_parameters_docstring()}\n"


_CONFIG_CLASSES: dict[type, type] = {}


def lwsam_config(config_cls: type[TrainingArguments]) -> type[TrainingArguments]:
    """The subclass of `config_cls` that also carries the `sam_*` options (`config_cls` itself when it already does).

    The class keeps every field and default of `config_cls` (TRL's `SFTConfig` keeps its `bf16`, gradient
    checkpointing and logging defaults) and adds the `sam_*` fields and their validation; repeated calls return the same
    class object. `lwsam_config(TrainingArguments)` is [`LWSAMConfig`].

    Args:
        config_cls (`type`): a `TrainingArguments` subclass, e.g. `trl.SFTConfig`.
    """
    cls = mixed_subclass(LWSAMConfigMixin, config_cls, (TrainingArguments, LWSAMConfig), "Config", _CONFIG_CLASSES,
                         "plus the `sam_*` options")
    globals().setdefault(cls.__name__, cls)  # importable by name, so the Trainer can pickle training_args.bin
    return cls


def mixed_subclass(mixin: type, base: type, root: tuple[type, type], suffix: str, cache: dict[type, type],
                   what: str) -> type:
    """`class <Base minus suffix>LWSAM<suffix>(mixin, base)`, made once per `base` and kept in `cache` (`SFTConfig`
    -> `SFTLWSAMConfig`, `DPOTrainer` -> `DPOLWSAMTrainer`); dataclasses stay dataclasses. `base` itself when it already
    has the mixin; for `root = (class, its LW-SAM class)`, that LW-SAM class."""
    if not (isinstance(base, type) and issubclass(base, root[0])):
        raise ValueError(f"{base!r} is not a {root[0].__name__} subclass: pass one, e.g. trl.SFT{suffix}.")
    if issubclass(base, mixin):
        return base
    if base is root[0]:
        return root[1]
    if base not in cache:
        name = base.__name__
        name = f"{name[: -len(suffix)]}LWSAM{suffix}" if name.endswith(suffix) else f"LWSAM{name}"
        cls = type(name, (mixin, base), {"__module__": mixin.__module__, "__qualname__": name,
                                         "__doc__": f"`{base.__name__}` {what}."})
        cache[base] = dataclass(cls) if is_dataclass(base) else cls
    return cache[base]


def as_lwsam_config(args: TrainingArguments | None, native_cls: type[TrainingArguments] = TrainingArguments):
    """`args` as an instance of `lwsam_config(...)`: returned as is when it carries the `sam_*` options, else copied
    field by field (every value kept, the `sam_*` options at their defaults) into `lwsam_config(type(args))`, or into
    `lwsam_config(native_cls)` when `args` is not a `native_cls` (the trainer's own config class, e.g. `SFTConfig`).
    `None` gives `lwsam_config(native_cls)(output_dir="trainer_output")`."""
    target = lwsam_config(native_cls)
    if args is None:
        return target(output_dir="trainer_output")
    if isinstance(args, LWSAMConfigMixin) and isinstance(args, native_cls):
        return args
    if isinstance(args, native_cls):
        target = lwsam_config(type(args))
    names = {f.name for f in fields(target) if f.init}
    values = {f.name: getattr(args, f.name) for f in fields(args)
              if f.init and f.name in names and hasattr(args, f.name)}
    if values.get("generation_batch_size") is not None and values.get("steps_per_generation") is not None:
        # TRL's GRPOConfig derives either from the other and refuses both: the pair is rebuilt from one
        values["generation_batch_size"] = None
    return target(**values)
