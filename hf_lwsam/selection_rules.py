"""Which parameters S a SAM step perturbs (`sam_selection`): one class per rule, in a registry.

A rule is one class and one registration line; `layers` names the modules whose parameters it perturbs:

    @register_selection_rule
    class LastNorm(SelectionRule):
        name = "last_norm"
        help = "the last LayerNorm only"

        def layers(self, model):
            return [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)][-1:]

    LWSAMConfig(..., sam_selection="last_norm")

The trainer builds one instance per model it trains and asks it, never the name: which layers and parameters
(`layers`, `parameters`), whether S changes while training runs (`changes_during_training`, `after_micro_batch`),
what it logs and checkpoints (`window_metrics`, `on_save`), which `sam_*` options only it reads (`options`, refused
set under any other rule), whether activations below S can ever be reused (`reuse_refusal`) and how the model card
and the mode names describe it. The allowed values of `sam_selection` are the registry's keys, read when a config is
built, so a rule registered before that is accepted.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

from torch import nn

from .probe import LayerProbe
from .registry import register
from .selection import Pattern, layer_parameters, name_matches, select_layers

SELECTION_RULES: dict[str, type[SelectionRule]] = {}


def register_selection_rule(cls: type[SelectionRule]) -> type[SelectionRule]:
    """Add `cls` to the registry under `cls.name` (the value of `sam_selection` that selects it); usable as a class
    decorator.

    Raises:
        ValueError: `cls` is no [`SelectionRule`], its `name` is not a non-empty string, or a rule of that name is
            already registered.
    """
    return register(SELECTION_RULES, cls, SelectionRule, "sam_selection")


def selection_rule(name: Any) -> type[SelectionRule]:
    """The rule registered as `name`.

    Raises:
        ValueError: no rule of that name is registered (the message lists the registered ones).
    """
    if not isinstance(name, str) or name not in SELECTION_RULES:
        raise ValueError(f"sam_selection={name!r} is unknown: use one of {', '.join(map(repr, SELECTION_RULES))}, or "
                         "register a rule of that name with hf_lwsam.register_selection_rule first.")
    return SELECTION_RULES[name]


def selection_help() -> str:
    """The `--sam_selection` help, from the registered rules' `help`."""
    shown = [f"{name!r} ({rule.help})" for name, rule in SELECTION_RULES.items()]
    listed = ", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else "".join(shown)
    return f"Which parameters to perturb: {listed}."


class SelectionRule:
    """One way to choose S. Subclasses set `name` (and `help`) and implement `layers`; the trainer builds one instance
    per model it trains (`SelectionRule(trainer)`).

    Attributes:
        name (`str`): the `sam_selection` value.
        help (`str`): which parameters it perturbs, in words (the `--sam_selection` help is built from these).
        options (`tuple[str, ...]`): the `sam_*` options only this rule reads: set off their defaults under another
            rule they are refused (`LWSAMConfig`).
        layer_wise (`bool`): S is a subset of the layers (layer-wise SAM, as the mode name, the model card's tags and
            citations say); `False`: every trainable parameter (conventional SAM).
        changes_during_training (`bool`): S may change while training runs: the trainer calls `after_micro_batch`
            after every micro-batch.
        reuse_refusal (`str`, *optional*): why pass 2 can never replay activations below S under this rule; `None`
            when activation reuse is planned from S.
        target_layers_unset (`str`, *optional*): what an unset `sam_target_layers` means under this rule, as the
            model card shows the option (`None`: shown unset).
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    layer_wise: ClassVar[bool] = True
    changes_during_training: ClassVar[bool] = False
    reuse_refusal: ClassVar[str | None] = None
    target_layers_unset: ClassVar[str | None] = None

    def __init__(self, trainer: Any):
        self._trainer = weakref.ref(trainer)

    @property
    def trainer(self) -> Any:
        """The trainer this instance selects for."""
        return self._trainer()

    @property
    def args(self) -> Any:
        """The trainer's current config."""
        return self._trainer().args

    # -- configuration -----------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, config: Any) -> None:
        """Refuse `config`'s options that do nothing under this rule (`ValueError` naming the option); called by
        `LWSAMConfig` after the unused-option refusals of `options`."""

    @classmethod
    def check_layers(cls, model: nn.Module, args: Any) -> None:
        """Dry-run `args`'s layer patterns on `model` (`ValueError` naming the option): the command-line tools call it
        on the model's skeleton, before any data is loaded. Default: nothing to check."""

    @classmethod
    def check_before_trainer(cls, model: nn.Module, args: Any) -> None:
        """Called by the trainer before the base trainer is built (before it creates `output_dir` or prepares data),
        on a plain model (no `peft_config`). Default: nothing; the rule validates in `layers`."""

    @classmethod
    def where(cls, args: Any) -> str:
        """Where a layer-wise mode perturbs, as the mode's name says it (`layer-wise SAM on the output side`)."""
        return "on the selected layers"

    @classmethod
    def perturbs(cls, args: Any) -> str:
        """Which parameters S holds, in words (the mode's description: "S is ...")."""
        return f"only the layers of `sam_selection={cls.name!r}` ({cls.help or 'a registered rule'}, listed below)"

    # -- the trainer's selection -------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> list[str] | None:
        """The names (as in `model.named_modules()`) of the layers to perturb: each perturbs the trainable parameters
        it owns directly. `None`: every trainable parameter (see `parameters`)."""
        raise NotImplementedError(f"{type(self).__name__}.layers")

    def select(self, model: nn.Module) -> list[str] | None:
        """`layers(model)`, checked: a list must be non-empty and name modules of `model`."""
        layers = self.layers(model)
        if layers is None:
            return None
        layers = list(layers)
        known = {name for name, _ in model.named_modules()}
        unknown = [name for name in layers if name not in known]
        if not layers or unknown:
            what = f"names no module of it: {unknown[:4]}" if unknown else "selects no layer of it"
            raise ValueError(f"sam_selection={self.name!r} ({type(self).__name__}.layers) {what} "
                             f"({type(model).__name__}); return names of model.named_modules() that own trainable "
                             "parameters.")
        return layers

    def parameters(self, model: nn.Module, layers: list[str] | None) -> list[tuple[str, nn.Parameter]]:
        """`(name, parameter)` of S for the current `layers` (what `layers` returned, or a later re-selection),
        resolved now (under FSDP2 the sharded parameters). Default: the trainable parameters `layers` own directly,
        every trainable parameter for `None`."""
        if layers is None:
            return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return layer_parameters(model, layers)

    def describe(self, layers: list[str] | None) -> str:
        """S in the log line the trainer writes when it resolves the parameters."""
        return "all trainable parameters" if layers is None else ", ".join(layers)

    @property
    def traces_first_batch(self) -> bool:
        """Whether the trainer re-decides the selection by execution order on the first batch (the output-side
        default, `selection.output_side_modules`)."""
        return False

    def after_micro_batch(self) -> None:
        """Called after every micro-batch's step when `changes_during_training` (it may call
        `trainer._set_sam_layers`)."""

    def window_metrics(self) -> dict[str, float]:
        """The rule's `sam/*` values for the logging window that ends now."""
        return {}

    def on_save(self) -> None:
        """Called when a checkpoint is written, before `trainer_state.json` (which marks it complete)."""

    def close(self) -> None:
        """Called when the trainer starts over on another model: undo what the instance registered."""


@register_selection_rule
class PatternSelection(SelectionRule):
    """`sam_selection="pattern"`: the layers `sam_target_layers` names (the output-side default when unset), minus
    those under `sam_exclude_layers` (`selection.select_layers`)."""

    name = "pattern"
    help = "the default: the layers named by --sam_target_layers, output-side default when unset"
    target_layers_unset = "default (output side)"

    @classmethod
    def check_layers(cls, model: nn.Module, args: Any) -> None:
        select_layers(model, args.sam_target_layers, args.sam_exclude_layers)

    @classmethod
    def check_before_trainer(cls, model: nn.Module, args: Any) -> None:
        cls.check_layers(model, args)

    @classmethod
    def where(cls, args: Any) -> str:
        if args.sam_target_layers is None and args.sam_exclude_layers is None:
            return "on the output side"
        return "on the selected layers"

    @classmethod
    def perturbs(cls, args: Any) -> str:
        if args.sam_target_layers is None and args.sam_exclude_layers is None:
            return "only the output-side layers (the default selection, listed below)"
        return "only the selected layers (`sam_target_layers` / `sam_exclude_layers`, listed below)"

    def layers(self, model: nn.Module) -> list[str]:
        return select_layers(model, self.args.sam_target_layers, self.args.sam_exclude_layers)

    @property
    def traces_first_batch(self) -> bool:
        return self.args.sam_target_layers is None


def excluded_parameters(model: nn.Module, exclude: Pattern) -> set[int]:
    """`sam_selection="all"` with `sam_exclude_layers`: the ids of the parameters that the modules `exclude` matches,
    and the modules under them, own (matched as `select_layers` matches). A parameter tied to one of them (GPT-2's
    `lm_head.weight` is `wte.weight`) is excluded too: it is the same tensor.

    Raises:
        ValueError: `exclude` matches no module.
    """
    modules = [(name, module) for name, module in model.named_modules() if name]
    roots = [name for name, _ in modules if name_matches(name, exclude)]
    if not roots:
        shown = [name for name, module in modules if list(module.parameters(recurse=False))][:6]
        raise ValueError(f"sam_exclude_layers={exclude!r} matches no module of {type(model).__name__}. Real layer "
                         f"names look like {shown}; a string is a regex matched with re.fullmatch against the whole "
                         "name, a list matches exact names or dotted suffixes.")
    return {id(p) for name, module in modules if any(name == r or name.startswith(r + ".") for r in roots)
            for p in module.parameters(recurse=False)}


@register_selection_rule
class AllSelection(SelectionRule):
    """`sam_selection="all"`: every trainable parameter but those of the `sam_exclude_layers` modules (conventional
    SAM). The parameters are resolved by identity when a step needs them (FSDP2 replaces them after `__init__`)."""

    name = "all"
    help = ("conventional SAM, set by every preset: every trainable parameter but the modules of "
            "--sam_exclude_layers")
    layer_wise = False
    reuse_refusal = "sam_selection='all' perturbs every layer, so there is nothing below the perturbed layers to reuse"

    @classmethod
    def validate(cls, config: Any) -> None:
        preset = config.sam_preset
        everything = "sam_selection='all'" + (f" (set by sam_preset={preset!r})" if preset else "")
        if config.sam_target_layers is not None:
            raise ValueError(f"sam_target_layers={config.sam_target_layers!r} does nothing with {everything}, which "
                             "perturbs every trainable parameter: use sam_selection='pattern' (without a preset) to "
                             "perturb only those layers, or drop sam_target_layers (sam_exclude_layers removes "
                             "modules from 'all').")
        if config.sam_reuse_activations is False:
            raise ValueError(f"sam_reuse_activations=False does nothing with {everything}: every layer is "
                             "perturbed, so there is nothing below them to reuse. Drop sam_reuse_activations.")

    @classmethod
    def perturbs(cls, args: Any) -> str:
        if args.sam_exclude_layers is None:
            return "every trainable parameter"
        return ("every trainable parameter but those of the modules that "
                f"`sam_exclude_layers={args.sam_exclude_layers!r}` matches")

    def layers(self, model: nn.Module) -> list[str] | None:
        """`None` (every trainable parameter), or with `sam_exclude_layers` the layers owning a trainable parameter
        that no excluded module owns (`""`: the model itself)."""
        exclude = self.args.sam_exclude_layers
        if exclude is None:
            return None
        excluded = excluded_parameters(model, exclude)
        layers = [name for name, module in model.named_modules()
                  if any(p.requires_grad and id(p) not in excluded for p in module.parameters(recurse=False))]
        if not layers:
            raise ValueError(f"sam_exclude_layers={exclude!r} leaves sam_selection='all' no trainable parameter to "
                             "perturb: the excluded modules own all of them. Exclude fewer modules.")
        return layers

    def parameters(self, model: nn.Module, layers: list[str] | None) -> list[tuple[str, nn.Parameter]]:
        exclude = self.args.sam_exclude_layers
        excluded = set() if exclude is None else excluded_parameters(model, exclude)
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in excluded]

    def describe(self, layers: list[str] | None) -> str:
        exclude = self.args.sam_exclude_layers
        return "all trainable parameters" + (f" but sam_exclude_layers={exclude!r}" if exclude else "")


@register_selection_rule
class ProbeSelection(SelectionRule):
    """`sam_selection="probe"`: the `k` candidates with the largest measured gradient norms, re-ranked during training
    by a [`LayerProbe`] callback (`hf_lwsam.probe`), which also restores the probed selection on resume."""

    name = "probe"
    help = "largest measured gradient norms"
    options = ("sam_top_k", "sam_top_ratio", "sam_probe_interval", "sam_probe_batches", "sam_probe_metric",
               "sam_probe_granularity")
    changes_during_training = True

    def __init__(self, trainer: Any):
        super().__init__(trainer)
        self.probe: LayerProbe | None = None

    @classmethod
    def check_layers(cls, model: nn.Module, args: Any) -> None:
        if args.sam_target_layers is None and args.sam_exclude_layers is None:
            return  # every layer is a candidate
        select_layers(model, ".+" if args.sam_target_layers is None else args.sam_target_layers,
                      args.sam_exclude_layers)

    @classmethod
    def where(cls, args: Any) -> str:
        return "on the probed layers"

    @classmethod
    def perturbs(cls, args: Any) -> str:
        return "only the layers with the largest measured gradient norms (`sam_selection='probe'`, listed below)"

    def layers(self, model: nn.Module) -> list[str]:
        """The probe's current selection (before the first probe: the `k` output-most candidates)."""
        if self.probe is None:
            self.probe = LayerProbe(self.trainer)  # validates the candidates and k now
            self.trainer.add_callback(self.probe)  # restores the probed selection on resume
        return self.probe.selected_layers()

    def after_micro_batch(self) -> None:
        """On a probe step's last micro-batch: rank the `.grad` norms, re-select."""
        self.probe.after_micro_batch(self.trainer)

    def window_metrics(self) -> dict[str, float]:
        return {"sam/selection_changed": float(self.probe.pop_changes())}  # the same on every process

    def on_save(self) -> None:
        self.probe._publish(self.trainer)  # a running probe's sums, read from the device at checkpoint time

    def close(self) -> None:
        if self.probe is not None:  # probed on the previous model: a new probe, as a new callback
            self.trainer.remove_callback(self.probe)
            self.probe = None
