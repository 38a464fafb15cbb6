"""Where e_S comes from on a SAM step (`sam_ascent`): one class per ascent, in a registry.

An ascent is one class and one registration line, written against the public host (`hf_lwsam.AscentHost`, which the
trainer implements):

    from hf_lwsam import Ascent, register_ascent

    @register_ascent
    class MyAscent(Ascent):
        name = "mine"
        help = "what e_S is, and what a step costs"

        def step(self, host, model, inputs, num_items_in_batch):
            named = host.sam_parameters()
            ...  # e_S for S
            loss = host.pass_at([p for _, p in named], steps, model, inputs, num_items_in_batch)
            host.record_sam_step(None, loss, norm, finite)
            return loss

The class declares the options it uses (`options`: any other ascent's option is refused by `LWSAMConfig` when set),
whether its logged loss is the clean one (`clean_loss`), whether it computes the clean gradient of S (`clean_gradient`,
LookSAM needs it), which vector a checkpoint must carry for an exact resume (`kept_vector`), and whether it supports
FSDP2's sharded parameters (`supports_sharded`) and ASAM (`supports_adaptive`); further checks of its options go in
`validate`, called by `LWSAMConfig`. `host.pass_at` is the one place that perturbs, runs the base class's pass and
restores S bit-exactly. The allowed values of `sam_ascent` are the registry's keys, read when a config is built.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .registry import register
from .sam import global_norm, looksam_component, momentum_scale, noise_seed, random_direction
from .sharding import all_reduce_mean, is_sharded, local, sum_over_shards

if TYPE_CHECKING:
    from torch import nn

    from .host import AscentHost

ASCENTS: dict[str, type[Ascent]] = {}


def register_ascent(cls: type[Ascent]) -> type[Ascent]:
    """Add an [`Ascent`] subclass to the registry under `cls.name`, the value of `sam_ascent` that selects it (usable
    as a class decorator). Register before the config is built: `LWSAMConfig` accepts the registry's names.

    Raises:
        ValueError: `cls` is not an `Ascent` subclass with a `name` and a `help`, or its name is taken.
    """
    return register(ASCENTS, cls, Ascent, "sam_ascent", {"help": "what e_S is and what a SAM step costs"})


def declared_options() -> dict[str, list[str]]:
    """Each option some registered ascent declares in its `options`, with the names of the ascents declaring it."""
    users: dict[str, list[str]] = {}
    for name, cls in ASCENTS.items():
        for option in cls.options:
            users.setdefault(option, []).append(name)
    return users


def refuse_sharded(params: list[torch.Tensor], what: str) -> None:
    """FSDP2 set up by the launcher rather than `fsdp=` (which the config refuses): refused at the first step."""
    if is_sharded(params):
        raise ValueError(f"{what} is not supported under FSDP2: it is implemented for whole (unsharded) parameters. "
                         "Use DDP, or sam_ascent='exact'/'stale' without LookSAM.")


class Ascent:
    """One source of e_S. Subclass it, set the class attributes, implement `step`, and register it
    ([`register_ascent`]).

    Attributes:
        name (`str`): the `sam_ascent` value.
        help (`str`): what e_S is and what a SAM step costs (the `--sam_ascent` help is built from the built-in ones).
        options (`tuple[str, ...]`): the `LWSAMConfig` options it uses beyond `sam_rho` and the selection, among those
            only some ascents use (`sam_sync_perturbation` and `sam_reuse_activations` are `ascent_gradient`'s); set
            away from its default, an option declared by other ascents and not by this one is refused.
        clean_loss (`bool`): the returned (logged) loss is the clean loss at w; otherwise the perturbed one.
        clean_gradient (`bool`): a SAM step computes the clean gradient of S (LookSAM needs it).
        kept_vector (`str`, *optional*): the kind of vector of S kept between steps (e.g. `"stale"`), saved with every
            checkpoint for an exact resume (`host.schedule`); `None`: nothing is kept. May be set per instance once
            decided (`prepare`).
        supports_sharded (`bool`): works on FSDP2's sharded parameters.
        supports_adaptive (`bool`): combines with `sam_adaptive=True` (ASAM scales a gradient).
    """

    name: ClassVar[str]
    help: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    clean_loss: ClassVar[bool] = False
    clean_gradient: ClassVar[bool] = False
    kept_vector: str | None = None
    supports_sharded: ClassVar[bool] = True
    supports_adaptive: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Any) -> None:
        """Refuse `config`'s combinations that this ascent does not support (`ValueError` naming the options)."""
        if config.sam_adaptive and not cls.supports_adaptive:
            raise ValueError(f"sam_ascent={cls.name!r} with sam_adaptive=True is not supported: {cls._no_adaptive}. "
                             "Set sam_adaptive=False.")
        if config.sam_interval_reuse == "looksam" and not cls.clean_gradient:
            raise ValueError(f"sam_interval_reuse='looksam' with sam_ascent={cls.name!r} is not supported: LookSAM "
                             "needs the clean gradient of the SAM step's ascent pass. Use sam_ascent='exact'.")
        from .config import fsdp_version, launch_source  # config imports this module

        if not cls.supports_sharded and fsdp_version(config) is not None:
            raise ValueError(f"sam_ascent={cls.name!r} is not supported with {launch_source(config, 'fsdp')}: it is "
                             "implemented for whole (unsharded) parameters. Use DDP, or sam_ascent='exact'/'stale' "
                             "without LookSAM.")

    _no_adaptive: ClassVar[str] = "it does not support it (supports_adaptive=False)"

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse, before the first step, an optimizer this ascent cannot work with (`ValueError`)."""

    def prepare(self, host: AscentHost, optimizer: Any = None) -> None:
        """At the trainer's `__init__` (`optimizer`: the one passed, if any) and when it creates its optimizer: check
        `optimizer` (and attach to it what the ascent needs)."""
        if optimizer is not None:
            self.check_optimizer(optimizer)

    def step(self, host: AscentHost, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
             ) -> torch.Tensor:
        """One micro-batch of a SAM step on `host` (the trainer: [`AscentHost`]); returns the loss the step logs.
        Perturb only through `host.pass_at`, and record the micro-batch (`host.record_sam_step` or
        `host.record_plain_step`)."""
        raise NotImplementedError


@register_ascent
class ExactAscent(Ascent):
    """SAM's ascent: pass 1 at w (a backward truncated at S) gives g_S, then the base step at w + e_S. With LookSAM
    (`sam_interval_reuse="looksam"`) it also keeps, per SAM window, the component g_v that the steps between add."""

    name = "exact"
    help = "a truncated ascent pass at w on the same micro-batch, two passes; the logged loss is the clean one"
    options = ("sam_sync_perturbation", "sam_reuse_activations")
    clean_loss = True
    clean_gradient = True

    def step(self, host: AscentHost, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
             ) -> torch.Tensor:
        """Pass 1 at w (truncated ascent), then the base step at w + e_S; returns pass 1's clean loss."""
        named = host.sam_parameters()
        params = [p for _, p in named]
        clean_loss, grads, grad_scale = host.ascent_gradient(model, inputs, num_items_in_batch, named)
        looksam = host.schedule.looksam
        if looksam:  # LookSAM: the window's clean gradient of S is the sum of pass 1's (copied: e_S reuses grads)
            host.schedule.add_clean(grads)
        # Under FSDP2 everything below works on this process's shards of S.
        steps, norm, finite = host.ascent_direction(params, grads)  # e_S = 0 where g_S is not finite
        del grads
        perturbed_loss = host.pass_at(params, steps, model, inputs, num_items_in_batch, after_pass_one=True)
        if looksam and host.accelerator.sync_gradients:
            self._keep_looksam_component(host, named)
        host.record_sam_step(clean_loss, perturbed_loss, norm / grad_scale, finite)
        return clean_loss

    @staticmethod
    def _keep_looksam_component(host: AscentHost, named: list[tuple[str, nn.Parameter]]) -> None:
        """After a SAM window's last backward (`.grad` of S is its all-reduced SAM gradient g_s), keep
        g_v = g_s - (<g_s, g> / ||g||^2) g with g the window's clean gradient of S (pass 1's, summed; averaged over the
        processes here unless `sam_sync_perturbation` already did it per micro-batch), so every process keeps the
        same g_v. Costs no backward: one copy of S's gradient while the window runs, one all-reduce of it under DDP."""
        names, params = [n for n, _ in named], [p for _, p in named]
        refuse_sharded(params, "sam_interval_reuse='looksam'")
        clean = host.schedule.pop_clean()
        if host.accelerator.num_processes > 1 and not host.args.sam_sync_perturbation:
            clean = all_reduce_mean(clean)
        sam = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        kept = looksam_component(sam, clean)
        host.schedule.keep(names, kept, like=params)
        # sin of the angle between g_s and g: the share of the SAM gradient that LookSAM keeps. Its added term has
        # norm alpha ||g|| whatever this is, so a small sin (SAM barely turned the gradient) is amplified alpha / sin.
        sin = global_norm(kept) / (global_norm(sam) + 1e-30)
        host.record_window("looksam_sin", sin.float())
        host.record_window("looksam_kept", 1)


@register_ascent
class StaleAscent(Ascent):
    """e_S from the gradient of S that the previous SAM step left in `.grad`: one pass at w + e_S."""

    name = "stale"
    help = ("the previous SAM step's gradient of S, one pass at w + e_S; the logged loss is the perturbed one")
    kept_vector = "stale"

    def step(self, host: AscentHost, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
             ) -> torch.Tensor:
        """One pass at w + e_S; returns the perturbed loss. Without a kept gradient for the current selection (first
        SAM step, or after a probe changed S): a plain step, whose gradient is kept for the next SAM step."""
        named = host.sam_parameters()
        names, params = [n for n, _ in named], [p for _, p in named]
        shards = local(params)  # under FSDP2: this process's shards of S, and of their gradients
        kept = host.schedule.direction(names, like=shards)
        if kept is None:
            steps, norm, finite = [torch.zeros_like(t) for t in shards], None, None
        else:
            # Clones: ascent_direction works in place, and every micro-batch of the window uses the same kept gradient.
            steps, norm, finite = host.ascent_direction(params, [g.clone() for g in kept])
        loss = host.pass_at(params, steps, model, inputs, num_items_in_batch)
        if host.accelerator.sync_gradients:  # the window's last backward: `.grad` holds its (all-reduced) gradient
            host.schedule.keep(names, local([p.grad for p in params]), like=shards, per_process=is_sharded(params))
        if kept is None:
            host.record_plain_step()
        else:
            host.record_sam_step(None, loss, norm, finite)  # scale-free direction: the norm is as kept (scaled)
        return loss


@register_ascent
class RandomAscent(Ascent):
    """Gaussian e scaled per weight row (`sam.random_direction`): one pass at w + e, nothing kept."""

    name = "random"
    help = ("Gaussian noise scaled per weight row by the row's norm, radius sam_rho; one pass, no ascent gradient; "
            "the logged loss is the perturbed one")
    supports_sharded = False
    supports_adaptive = False
    _no_adaptive = ("the random perturbation is already scaled per weight row by the row's norm (ASAM scales a "
                    "gradient)")

    def __init__(self) -> None:
        self._targets: tuple[list[str], list[tuple[torch.Tensor, Any, int]]] | None = None  # per selection

    def step(self, host: AscentHost, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
             ) -> torch.Tensor:
        """One pass at w + e, e drawn from generators seeded by (`seed`, optimizer step, parameter index): the same e
        on every process, for every micro-batch of the window and after a resume. Returns the perturbed loss."""
        targets = self.targets(host)
        params = [t for t, _, _ in targets]
        refuse_sharded(params, "sam_ascent='random'")
        step = host.state.global_step
        with torch.no_grad():  # the merged LoRA weights only scale the noise: no graph through B A
            references = [ref() if callable(ref) else ref for _, ref, _ in targets]
        steps = random_direction(params, host.args.sam_rho,
                                 [noise_seed(host.args.seed, step, i) for i in range(len(params))],
                                 [d for _, _, d in targets], references)
        del references
        loss = host.pass_at(params, steps, model, inputs, num_items_in_batch)
        host.record_plain_step()  # no loss or norm is logged for the random perturbation: only its SAM steps
        if host.accelerator.sync_gradients:
            host.record_window("sam_steps", 1)
        return loss

    def targets(self, host: AscentHost) -> list[tuple[torch.Tensor, Any, int]]:
        """(tensor to perturb, the weight whose rows scale its noise (or a callable computing it), row dimension) for
        the selection S. A LoRA module of S (PEFT) perturbs its frozen base weight, scaled by the rows of the merged
        weight W + scale * B A (`get_delta_weight`, one r-rank product per module and micro-batch), as Flat-LoRA does;
        its adapters are not perturbed. Every other parameter of S is perturbed itself. GPT-2's `Conv1D` stores W
        transposed: its rows are dimension 1. Cached per selection."""
        from transformers.pytorch_utils import Conv1D
        from transformers.utils import logging

        named = host.sam_parameters()
        names = [n for n, _ in named]
        if self._targets is not None and self._targets[0] == names:
            return self._targets[1]
        modules = dict(host.model.named_modules())
        targets, merged = [], set()
        for name, param in named:
            if ".lora_A." in name or ".lora_B." in name:  # <owner>.lora_A.<adapter>.weight
                owner, _, rest = name.partition(".lora_")
                adapter = rest.split(".")[1]
                module = modules.get(owner)
                base = getattr(getattr(module, "base_layer", None), "weight", None)
                if (isinstance(base, torch.nn.Parameter) and type(base) is torch.nn.Parameter
                        and base.dtype.is_floating_point and hasattr(module, "get_delta_weight")):
                    if owner not in merged:
                        merged.add(owner)
                        row_dim = 1 if isinstance(module.base_layer, Conv1D) else 0
                        targets.append((base, lambda b=base, m=module, a=adapter: b + m.get_delta_weight(a), row_dim))
                    continue
                logging.get_logger(__name__).warning_once(
                    f"LW-SAM random perturbation: {owner} has no plain floating-point base weight (quantized?); its "
                    "adapters are perturbed instead of the merged weight.")
            module = modules.get(name.rpartition(".")[0])
            row_dim = 1 if isinstance(module, Conv1D) and name.endswith("weight") and param.dim() == 2 else 0
            targets.append((param, param, row_dim))
        self._targets = (names, targets)
        return targets


# The torch optimizers whose state holds Momentum-SAM's m, and under which key. Each one's step (single-tensor, foreach
# and fused alike) updates `exp_avg.lerp_(grad, 1 - beta1)`: the beta1-average of the gradients; SGD's
# `momentum_buffer` is `momentum * buf + (1 - dampening) * grad`. Only these exact classes: a subclass's step may keep
# the same key differently.
FIRST_MOMENTS: dict[type, str] = {
    torch.optim.Adam: "exp_avg",
    torch.optim.AdamW: "exp_avg",
    torch.optim.NAdam: "exp_avg",
    torch.optim.RAdam: "exp_avg",
    torch.optim.Adamax: "exp_avg",
    torch.optim.SGD: "momentum_buffer",
}
_READ = "hf_lwsam reads exp_avg of torch.optim Adam, AdamW, NAdam, RAdam and Adamax, and momentum_buffer of SGD"
MOMENTUM_FIX = ("Use optim='adamw_torch' (or 'adamw_torch_fused', or SGD with momentum > 0: optim='sgd', "
                "optim_args='momentum=0.9'), or an ascent that reads no optimizer state: sam_preset='exact' or "
                "'fast' (or sam_ascent='exact'), or set sam_momentum='own' (an average of the gradients kept by "
                "hf_lwsam, for any optimizer)")
# `sam_momentum`: where Momentum-SAM's m comes from. Unset: "optimizer", or under sam_preset='free' whichever the
# optimizer allows (`momentum_source`).
MOMENTUM_SOURCES = ("optimizer", "own")
DEFAULT_MOMENTUM_BETA = 0.9


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def unreadable_moment(cls: type, groups: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why an optimizer of class `cls` with these parameter groups (their hyperparameters) keeps no first moment that
    Momentum-SAM can use, and what to set instead; `None` when it keeps one."""
    key = FIRST_MOMENTS.get(cls)
    if key is None:
        base = next((b for b in cls.__mro__ if b in FIRST_MOMENTS), None)  # the nearest one
        if base is not None:
            return (f"it subclasses {_qualname(base)}, and a subclass's step may keep {FIRST_MOMENTS[base]} "
                    f"differently: only the classes themselves are read ({_READ})", MOMENTUM_FIX)
        return f"it keeps no first moment that can be read ({_READ})", MOMENTUM_FIX
    for group in groups:
        if group.get("maximize", False):  # the step negates the gradient first: m would point the other way
            return (f"maximize=True makes its {key} an average of the negated gradient",
                    "Minimize (maximize=False), or use another sam_ascent")
        if key == "exp_avg" and float(group["betas"][0]) <= 0:  # lerp weight 1: exp_avg is the last gradient
            return ("its beta1 is 0 (betas[0]; TrainingArguments' adam_beta1), so exp_avg is the last gradient, not "
                    "an average of gradients", "Set adam_beta1 (betas[0]) > 0, e.g. 0.9")
        if key == "momentum_buffer" and not group.get("momentum", 0) > 0:
            return "SGD without momentum keeps none", MOMENTUM_FIX
        if key == "momentum_buffer" and group.get("dampening", 0) >= 1:  # buf = momentum * buf: never a new gradient
            return ("dampening=1 keeps momentum_buffer at its first gradient", "Set dampening < 1 (e.g. 0, the "
                    "default)")
    return None


def first_moments(optimizer: Any) -> tuple[str, Any]:
    """Which first moment `optimizer` keeps per parameter, and the torch optimizer holding it (accelerate's wrapper
    removed): `"exp_avg"` for torch's Adam, AdamW, NAdam, RAdam and Adamax with beta1 > 0 (fused, foreach or not),
    `"momentum_buffer"` for SGD with momentum > 0 and dampening < 1. The trainer calls it before the first step, and
    it can be called on any optimizer meant for `optimizers=(optimizer, None)`.

    Raises:
        ValueError: the optimizer keeps no first moment that can be read (Adafactor, 8-bit or paged states, a subclass,
            beta1 = 0, SGD without momentum, `maximize=True`, anything else): names it, why, and what to use.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    why = unreadable_moment(type(inner), inner.param_groups)
    if why is not None:
        raise ValueError(f"sam_ascent='momentum' needs the optimizer's first moment, but the optimizer is "
                         f"{_qualname(type(inner))}: {why[0]}. {why[1]}.")
    return FIRST_MOMENTS[type(inner)], inner


# `optim` values whose optimizer is a torch.optim class, built without an extra package (the others keep no moment
# that can be read: Adafactor, bitsandbytes 8-bit/paged/Lion/RMSprop, torchao 4/8-bit, schedule-free, GaLore, APOLLO,
# LOMO, GrokAdamW, StableAdamW, AnyPrecisionAdamW, the XLA and NPU AdamWs).
_TORCH_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")


def check_optim(config: Any) -> None:
    """Refuse, when the config is built, an `optim` whose optimizer keeps no first moment Momentum-SAM can read: the
    class and hyperparameters are the ones the Trainer will use (`Trainer.get_optimizer_cls_and_kwargs`: `optim`,
    `adam_beta1`, `optim_args`), judged as [`first_moments`] judges a live optimizer."""
    why = optim_unreadable(config)
    if why is not None:
        raise ValueError(why)


def optim_unreadable(config: Any) -> str | None:
    """Why the optimizer that `optim` builds keeps no first moment Momentum-SAM can read (the refusal's message), or
    `None` when it keeps one.

    Raises:
        ValueError: `optim_args` cannot be read.
    """
    from transformers import Trainer

    optim = getattr(config.optim, "value", config.optim)
    if optim not in _TORCH_OPTIMS:
        return (f"sam_ascent='momentum' needs the optimizer's first moment, but optim={optim!r} keeps none that can be "
                f"read ({_READ}). {MOMENTUM_FIX}.")
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(config)
    except ValueError as e:  # transformers' own reading of optim_args ("key=value,...")
        raise ValueError(f"optim_args={config.optim_args!r} cannot be read ({e}): write it as key=value pairs "
                         "separated by commas, e.g. 'momentum=0.9'.") from None
    defaults = {n: p.default for n, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    why = unreadable_moment(cls, [{**defaults, **kwargs}])
    if why is None:
        return None
    return (f"sam_ascent='momentum' needs the optimizer's first moment, but optim={optim!r} builds {_qualname(cls)} "
            f"with {_shown(kwargs)}: {why[0]}. {why[1]}.")


def momentum_source(config: Any, optimizer: Any = None) -> str | None:
    """Where Momentum-SAM's m comes from under `config` (`sam_ascent="momentum"`): `"optimizer"` (its first moment)
    or `"own"` (an average kept by hf_lwsam). `sam_momentum` when set; unset, `"optimizer"`, except under
    `sam_preset="free"`: `"optimizer"` when the optimizer keeps a readable first moment, else `"own"`, judged on
    `optimizer` when given (a live one, e.g. passed as `optimizers=(optimizer, None)`), else on `optim`."""
    if config.sam_momentum is not None:
        return config.sam_momentum
    if config.sam_preset != "free":
        return "optimizer"
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        return "optimizer" if unreadable_moment(type(inner), inner.param_groups) is None else "own"
    return "optimizer" if optim_unreadable(config) is None else "own"


def _shown(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("lr", "eps")) or "its defaults"


@register_ascent
class MomentumAscent(Ascent):
    """Momentum-SAM: e_S = -rho m_S / ||m_S||, m an average of the gradients after the previous optimizer step: one
    forward and one backward at w + e_S per micro-batch, S restored bit-exactly, and the stock optimizer steps at w
    (Becker et al., arXiv 2401.12033; the reference code, MarlonBecker/MSAM `adamW_msam.py`, keeps w perturbed between
    steps and subtracts `rho / ||exp_avg|| * exp_avg` after each optimizer step, the same point).

    m is, by `sam_momentum` (`momentum_source`), the optimizer's first moment (`"optimizer"`: `exp_avg` of
    Adam/AdamW, `momentum_buffer` of SGD; in the optimizer's checkpoint) or an average kept here (`"own"`, any
    optimizer): m <- beta m + (1 - beta) g from m = 0, g the gradient of S the optimizer steps with (accumulated,
    all-reduced, clipped, unscaled), updated by an optimizer step pre-hook, so a step the fp16 GradScaler skips leaves
    it as it was (and a non-finite g, stepped anyway without a scaler, leaves it too). It is one float32 copy of S,
    saved with every checkpoint (`AscentSchedule`, per process under FSDP2); it starts over when the selection
    changes (a probe). With AdamW and beta = beta1 both give the same updates. m is identical on every process (DDP
    all-reduces g), so no communication; under FSDP2 each process holds a shard of m and the norm is one all-reduce.

    e_S = s m_S is never formed on its own: its factor s = -rho / ||m_S|| is computed once per optimizer step, on the
    window's first micro-batch (m only changes at the optimizer step), and every micro-batch writes w + s m_S,
    rounded as `w + (m_S * s).to(S's dtype)`, into a buffer swapped in as S's storage for the pass
    (`Perturbation.apply`; in place with a backup where S's tensors are views, as FSDP2's shards are). The buffer is
    kept between steps on the CPU, freed after each pass on a GPU. A SAM step before any m (the first step) is a plain
    step; a parameter of S without a moment yet is not perturbed. Its radius is much larger than SAM's in the paper
    (rho = 3 for ViT on ImageNet); sweep it, small models collapse there."""

    name = "momentum"
    help = ("Momentum-SAM: -sam_rho * m / ||m||, m the optimizer's first moment (Adam/AdamW exp_avg, SGD "
            "momentum_buffer) or an average of the gradients kept by hf_lwsam (sam_momentum) after the previous "
            "step; one pass at w + e_S, no ascent gradient; the logged loss is the perturbed one")
    options = ("sam_momentum", "sam_momentum_beta")
    supports_adaptive = False
    _no_adaptive = "the adaptive (ASAM) form of the momentum ascent is not implemented"

    def __init__(self) -> None:
        self.source: str | None = None  # "optimizer" or "own", once decided (`prepare`)
        self._hooked: tuple[Any, Any] | None = None  # (weakref to the hooked torch optimizer, the hook's handle)
        self._host: Any = None  # weakref to the trainer whose S the hook averages
        self._cached: tuple[Any, Any, Any, Any, Any] | None = None  # this window's (key, m_S, scale, norm, usable)

    @classmethod
    def validate(cls, config: Any) -> None:
        from .config import deepspeed_stage, launch_source  # config imports this module

        super().validate(config)
        if deepspeed_stage(config) is not None:
            raise ValueError(f"sam_ascent='momentum' with DeepSpeed ({launch_source(config, 'deepspeed')}) is not "
                             "supported: DeepSpeed keeps the optimizer's moments inside its engine. Use DDP or FSDP2.")
        if config.sam_momentum is not None and config.sam_momentum not in MOMENTUM_SOURCES:
            raise ValueError(f"sam_momentum={config.sam_momentum!r} is unknown: use 'optimizer' (the optimizer's "
                             "first moment) or 'own' (an average of the gradients kept by hf_lwsam).")
        beta = config.sam_momentum_beta
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1):
            raise ValueError(f"sam_momentum_beta={beta!r} is invalid: use a decay in [0, 1) (e.g. 0.9, Adam's "
                             "beta1).")
        source = momentum_source(config)
        if source == "optimizer" and beta is not None:
            raise ValueError(f"sam_momentum_beta={beta!r} does nothing with sam_momentum='optimizer' (the optimizer's "
                             "first moment decays with the optimizer's own beta): set sam_momentum='own', or drop "
                             "sam_momentum_beta.")
        if config.sam_momentum == "optimizer" or (config.sam_momentum is None and config.sam_preset != "free"):
            check_optim(config)

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse an optimizer without a readable first moment, unless m is the ascent's own average (it is decided
        on this optimizer under `sam_preset="free"` with `sam_momentum` unset)."""
        if self.source != "own":
            first_moments(optimizer)

    def prepare(self, host: AscentHost, optimizer: Any = None) -> None:
        """Decide where m comes from (`momentum_source`, logged when decided or changed): at `__init__` from `optim`,
        then again on the optimizer the trainer will step (created, or passed at `__init__`). On that optimizer,
        refuse it without a readable moment for `"optimizer"`, and for `"own"` register the pre-hook that averages the
        gradient of S on the torch optimizer (accelerate's wrapper removed), once per optimizer."""
        import weakref

        from transformers.utils import logging

        source = momentum_source(host.args, optimizer)
        inner = getattr(optimizer, "optimizer", optimizer)
        if source != self.source:
            self.source = source
            which = f"optim={getattr(host.args.optim, 'value', host.args.optim)!r}" if inner is None else (
                _qualname(type(inner)))
            why = ("sam_momentum='own'" if host.args.sam_momentum == "own" else
                   f"{which} keeps no first moment it reads" if source == "own" else f"the first moment of {which}")
            logging.get_logger(__name__).info(
                f"LW-SAM Momentum-SAM takes m from {why}" if source == "optimizer" else
                f"LW-SAM Momentum-SAM keeps its own average of the gradients of S (beta={momentum_beta(host.args)}, "
                f"one float32 copy of S): {why}")
        self.kept_vector = "momentum" if source == "own" else None  # the own average: saved with every checkpoint
        if inner is None:
            return
        self.check_optimizer(optimizer)
        if source != "own" or (self._hooked is not None and self._hooked[0]() is inner):
            return  # `create_optimizer` runs again on every `train()`: one hook per optimizer
        if self._hooked is not None:
            self._hooked[1].remove()
        self._host = weakref.ref(host)
        self._hooked = (weakref.ref(inner), inner.register_step_pre_hook(self._average))

    @torch.no_grad()
    def _average(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The optimizer step pre-hook: m_S <- beta m_S + (1 - beta) g_S, g_S the `.grad` of S the optimizer is about
        to step with. Not called on a step the GradScaler skips; a non-finite g_S (no scaler) leaves m as it was."""
        host = self._host() if self._host is not None else None
        if host is None:
            return
        named = host.sam_parameters()
        params = [p for _, p in named]
        host.schedule.average([n for n, _ in named], local([p.grad for p in params]), local(params),
                              momentum_beta(host.args), per_process=is_sharded(params))

    def _moments(self, host: AscentHost, named: list[tuple[str, Any]], shards: list[torch.Tensor]
                 ) -> list[torch.Tensor] | None:
        """m of this process's `shards` of S (zeros where a parameter has none yet), `None` before any m."""
        if self.source == "own":
            return host.schedule.direction([n for n, _ in named], like=shards)
        key, optimizer = first_moments(host.optimizer)
        state = [optimizer.state.get(p, {}).get(key) for _, p in named]
        if all(m is None for m in state):
            return None
        return [torch.zeros_like(t) if m is None else m for m, t in zip(local(state), shards)]

    def step(self, host: AscentHost, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
             ) -> torch.Tensor:
        """One pass at w + e_S; returns the perturbed loss. e_S is computed on the window's first micro-batch and
        reused by the others (m only changes at the optimizer step), then freed after the window's last one."""
        if self.source is None:  # an optimizer set on the trainer after __init__, not through create_optimizer
            self.prepare(host, host.optimizer)
        named = host.sam_parameters()
        params = [p for _, p in named]
        shards = local(params)
        key = (host.state.global_step, [n for n, _ in named])
        if self._cached is None or self._cached[0] != key:
            moments = self._moments(host, named, shards)
            if moments is None:
                self._cached = (key, None, None, None, None)
            else:  # e_S = scale * m_S, formed by no one: pass_at writes w + e_S (own m: float32, S's dtype)
                scale, norm, finite = momentum_scale(moments, host.args.sam_rho, sum_across=sum_over_shards(params))
                self._cached = (key, moments, scale, norm, finite)
        _, moments, scale, norm, finite = self._cached
        if host.accelerator.sync_gradients:  # the window's last micro-batch: m is not needed after its pass
            self._cached = None
        if moments is None:  # no m yet (no optimizer step): a plain step
            loss = host.pass_at([], [], model, inputs, num_items_in_batch)
            host.record_plain_step()
            return loss
        # a copy of the list: pass_at clears the one it gets, and m itself is only read
        loss = host.pass_at(params, list(moments), model, inputs, num_items_in_batch, scale=scale)
        # ||e_S|| is rho by construction (0 where m is unusable), over the whole of S: no norm of this process's shards
        host.record_sam_step(None, loss, norm, finite, e_norm=finite * host.args.sam_rho)
        return loss


def momentum_beta(config: Any) -> float:
    """The decay of the own average: `sam_momentum_beta`, 0.9 when unset."""
    return DEFAULT_MOMENTUM_BETA if config.sam_momentum_beta is None else float(config.sam_momentum_beta)


def ascent_help() -> str:
    """The `--sam_ascent` help text, from the registry."""
    return "Where e_S comes from on a SAM step: " + "; ".join(f"'{n}' ({a.help})" for n, a in ASCENTS.items()) + "."
