"""`LWSAMTrainer`: the stock `Trainer` with a layer-wise SAM `training_step`. The math lives in `sam.py`."""

from __future__ import annotations

import copy
import inspect
import time
import typing
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from accelerate.utils.memory import should_reduce_batch_size
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .ascent import ASCENTS
from .config import as_lwsam_config, mixed_subclass
from .preemption import PreemptionCallback
from .probe import LayerProbe
from .reuse import ActivationReuse, capture_rng, is_compiled, plan_reuse, restore_rng
from .running_stats import BufferGuard
from .sam import Perturbation, ascent_direction, looksam_add_
from .schedule import AscentSchedule
from .selection import select_layers, trace_execution_order
from .selection_rules import SelectionRule, selection_rule
from .sharding import (
    all_reduce_mean,
    capture_unsharded,
    gradient_of,
    is_sharded,
    local,
    reshard,
    shards_of,
    sum_over_shards,
)

logger = logging.get_logger(__name__)


# Trainers whose step does not compose with two passes over one prepared batch.
_REFUSED_TRAINERS = {
    "RLOOTrainer": "its loss always weighs a completion by the sequence-level ratio exp(sum of log pi - log pi_old) "
    "against the log-probabilities recorded at generation, left unclipped for a negative advantage, so at w + e_S "
    "the ratio, and the perturbed gradient, grow exponentially with the completion's length",
}


def _native_config_class(trainer_cls: type) -> type[TrainingArguments]:
    """The config class `trainer_cls` expects for `args` (the most derived `TrainingArguments` subclass in the
    annotation of its `args` parameter), `TrainingArguments` if it cannot be read."""
    try:
        hint = typing.get_type_hints(trainer_cls.__init__).get("args")
    except Exception:  # unresolvable forward references
        return TrainingArguments
    found = [t for t in (typing.get_args(hint) or (hint,)) if isinstance(t, type) and issubclass(t, TrainingArguments)]
    return max(found, key=lambda t: len(t.__mro__), default=TrainingArguments)


_MISSING = object()  # no instance attribute of that name
# The image inputs TRL's GRPO batch carries for the whole batch and passes to the model with it
_GRPO_IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                      "token_type_ids", "mm_token_type_ids", "image_position_ids")


class LWSAMMixin:
    r"""
    The layer-wise SAM `training_step` for any [`~transformers.Trainer`] subclass: put it first among the bases
    (`class MyTrainer(LWSAMMixin, SFTTrainer)`), or use [`lwsam_trainer`].

    With the default exact ascent every micro-batch of a SAM step takes two passes: the ascent gradient g_S of the
    selected parameters S at w (a truncated backward that leaves `.grad` alone), then the base class's own
    `training_step` at w + e_S, after which S is restored bit-exactly. The one-pass ascents (`sam_ascent="stale"`,
    `"random"`, `"momentum"`; `hf_lwsam.ascent`) take e_S from elsewhere and run only the second pass. The optimizer,
    scheduler, clipping and checkpointing are the base class's.

    The micro-batch's inputs are prepared once (`_prepare_inputs`) and both passes use them. What the base class's
    `compute_loss` records as a side effect (TRL's `_metrics` lists and `_total_train_tokens`) is kept once per
    micro-batch, from the pass whose loss `training_step` returns: with the exact ascent pass 1, the clean pass, so
    metrics and token counts are those of plain training; with a one-pass ascent its only pass, at w + e_S, so the
    metrics are those of the perturbed model.

    Args:
        args (`TrainingArguments`, *optional*):
            Training options carrying the `sam_*` fields (an instance of [`lwsam_config`]`(...)`, e.g. [`LWSAMConfig`]).
            Any other config is copied field by field into such a class, every value kept and the `sam_*` options at
            their defaults; `None` gives the defaults.
        *other arguments*: as for the base trainer; positional arguments are bound to the base's parameters and
            passed on by keyword.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        base = next(c for c in type(self).__mro__ if issubclass(c, Trainer) and not issubclass(c, LWSAMMixin))
        for name in (c.__name__ for c in base.__mro__):
            if name in _REFUSED_TRAINERS:
                raise ValueError(f"{name} is not supported by hf_lwsam: {_REFUSED_TRAINERS[name]}. Use "
                                 "GRPOLWSAMTrainer (hf_lwsam.trl), whose ratio is per token, SFTLWSAMTrainer or "
                                 "DPOLWSAMTrainer, or LWSAMTrainer.")
        signature = inspect.signature(base.__init__)
        bound = signature.bind(None, *args, **kwargs).arguments  # None stands for self
        bound.pop(next(iter(signature.parameters)))
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
            elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and bound.pop(name, ()):
                raise TypeError(f"{base.__name__} takes extra positional arguments; pass them by keyword.")
        bound["args"] = args = as_lwsam_config(bound.get("args"), _native_config_class(base))
        model = bound.get("model")
        if isinstance(model, nn.Module) and bound.get("peft_config") is None:
            # Bad layer names fail here, before the base trainer creates output_dir or prepares data.
            selection_rule(args.sam_selection).check_before_trainer(model, args)
        super().__init__(**bound)
        from .loss_kwargs import fix_loss_kwargs  # a loss that ignores num_items_in_batch is averaged, not multiplied

        fix_loss_kwargs(self)
        self._selection: SelectionRule | None = None
        self._start_model_state()  # validates the layer patterns now, not at the first step
        # `optimizers=(optimizer, scheduler)`: refused now, not at the first step (else decided from `optim`)
        self._ascent.prepare(self, self.optimizer)

    # ------------------------------------------------------------------------------------------ per-model state
    def _start_model_state(self) -> None:
        """Build, for `self.model`, everything that holds its modules or tensors or was decided on it: the selection and
        its parameters, the reuse plan, the buffer guard, the default selection's trace, the probe, the schedule and its
        kept vector, and the ascent (from the current options; with its caches, e.g. the random ascent's targets)."""
        self._state_model = weakref.ref(self.model)
        self._ascent = ASCENTS[self.args.sam_ascent]()
        self._schedule = AscentSchedule(self.args.sam_interval, self._ascent, self.args.sam_start,
                                        self.args.sam_interval_reuse)
        self._sam_window: dict[str, Any] = {}
        self._buffer_guard = BufferGuard(self.model)
        self._pass_one: tuple[ExitStack, ActivationReuse | None, Any] | None = None  # `ascent_gradient`'s open pass 1
        if self._selection is not None:  # the previous model's rule (a probe's callback): undone
            self._selection.close()
        self._selection = selection_rule(self.args.sam_selection)(self)
        self._set_sam_layers(self._selection.select(self.model))  # validates the layer patterns now
        # The default selection ("after the trunk") is re-decided by execution order on the first batch.
        self._default_selection_untraced = self._selection.traces_first_batch

    def _hp_search_setup(self, trial: Any) -> None:
        """Called by `train()` after `model_init` built the model to train (and `hyperparameter_search` set the trial's
        options): a new model gets a new per-model state, none of it kept from the previous model."""
        super()._hp_search_setup(trial)
        if self._state_model() is not self.model:
            self._start_model_state()

    # ----------------------------------------------------------------------------------------------- selection
    @property
    def _layer_probe(self) -> LayerProbe | None:
        """The [`LayerProbe`] of `sam_selection="probe"` (its history, last norms and selection); `None` under another
        rule."""
        return getattr(self._selection, "probe", None)

    @torch.no_grad()
    def _trace_default_selection(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """Once, on the first batch: one no-grad eval forward that orders the modules by execution, so the default
        selection keeps only modules that run after the trunk (registration order can put modules that run before it,
        such as BART's `layernorm_embedding`, after it)."""
        self._default_selection_untraced = False
        # Module hooks see every call only in eager mode: trace the uncompiled module (torch_compile=True wraps it in
        # an OptimizedModule), with any in-place `nn.Module.compile` forced to eager for this one forward.
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        rng = capture_rng()
        try:
            unwrapped.eval()
            with self.compute_loss_context_manager(), torch.compiler.set_stance("force_eager"):
                order = trace_execution_order(unwrapped, lambda: unwrapped(**self._model_inputs(inputs)))
            # FSDP2's root module keeps its parameters unsharded after a forward without backward, as separate tensors
            # (a tied head no longer shares the embedding's): select on the sharded ones.
            reshard(unwrapped)
            # Under this model's own names: a model compiled before it was given to the trainer holds the traced
            # module as `_orig_mod`.
            prefix = next((name for name, module in self.model.named_modules() if module is unwrapped), "")
            order = ({".".join(filter(None, (prefix, name))): entry for name, entry in order[0].items()}, order[1])
            # Never drop modules silently: the hooks must have seen the trunk run, under this model's own names.
            if order[1] < 0 or not set(order[0]) <= {name for name, _ in self.model.named_modules()}:
                raise RuntimeError("the module hooks did not see the trunk run under the model's own module names")
            layers = select_layers(self.model, None, self.args.sam_exclude_layers, order=order)
        except Exception as e:  # a model that cannot run on the batch as is: keep the registration-order default
            if should_reduce_batch_size(e):  # auto_find_batch_size retries with a smaller batch: trace that one
                self._default_selection_untraced = True
                raise
            logger.warning(f"LW-SAM could not trace the execution order ({type(e).__name__}: {e}); the default "
                           "selection stays by registration order.")
            return
        finally:
            unwrapped.train()
            restore_rng(rng)
        if layers != self._sam_layers:
            dropped = sorted(set(self._sam_layers or []) - set(layers))
            never_ran = [name for name in dropped if name not in order[0]]
            logger.info(f"LW-SAM default selection by execution order: left out {', '.join(dropped) or 'nothing'} "
                        "(run before the trunk or never called).")
            if never_ran:
                logger.warning(f"LW-SAM default selection: {', '.join(never_ran)} never ran in the traced forward and "
                               "are not perturbed; if they do run in training, name them in sam_target_layers.")
            self._set_sam_layers(layers)

    def _sam_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if self._sam_params is None:
            reshard(self.model)  # under FSDP2 S is the sharded parameters, even after a forward without backward
            # resolved now (`"all"` by identity: FSDP2 replaced the parameters since __init__)
            self._sam_params = self._selection.parameters(self.model, self._sam_layers)
            layers = self._selection.describe(self._sam_layers)
            numel = sum(p.numel() for _, p in self._sam_params)
            logger.info(f"LW-SAM perturbs {len(self._sam_params)} tensors ({numel:,} parameters): {layers}")
        return self._sam_params

    def _set_sam_layers(self, layers: list[str] | None) -> None:
        """Change the selection (e.g. after a probe); the parameters and the reuse plan are re-resolved lazily."""
        self._sam_layers, self._sam_params, self._reuse_plan, self.reuse_disabled_reason = layers, None, None, None

    def _activation_reuse(self, params: list[nn.Parameter]) -> ActivationReuse | None:
        """The reuse helper for this step, or `None` (plain two-pass) with the reason logged once."""
        if not self.args.sam_reuse_activations or self.reuse_disabled_reason is not None:
            return None
        if self._reuse_plan is None:
            if self._selection.reuse_refusal is not None:
                plan = self._selection.reuse_refusal
            elif is_compiled(self.model_wrapped) or is_compiled(self.model):
                plan = ("torch_compile=True runs the model as a compiled graph, into which the per-block replay "
                        "(Python wrappers swapped in for each micro-batch) cannot be traced without recompiling; "
                        "pass 2 recomputes. For reuse, train with torch_compile=False")
            elif is_sharded(params):
                plan = ("FSDP2 reshards each block after its forward, so replaying the lower blocks would keep their "
                        "unsharded activations' graph across the all-gathers; not supported yet")
            else:
                plan = plan_reuse(self.model, params)
            if isinstance(plan, str):
                self._disable_reuse(plan)
                return None
            self._reuse_plan = plan
            logger.info(f"LW-SAM activation reuse: pass 2 replays the first {plan[1]} of {len(plan[0])} trunk blocks")
        return ActivationReuse(*self._reuse_plan)

    def _disable_reuse(self, reason: str) -> None:
        self.reuse_disabled_reason = reason
        log = logger.info if self._selection.reuse_refusal is not None else logger.warning  # expected: info
        log(f"LW-SAM activation reuse is off, pass 2 recomputes the whole model: {reason}.")

    def perturbed_parameter_names(self) -> list[str]:
        """Names, as in `model.named_parameters()` of the model given to the trainer, of the parameters the current
        step perturbs."""
        return [name for name, _ in self._sam_parameters()]

    @property
    def num_perturbed_layers(self) -> int:
        """How many layers (modules owning trainable parameters) the current step perturbs."""
        if self._sam_layers is not None:
            return len(self._sam_layers)
        return sum(1 for m in self.model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))

    # ---------------------------------------------------------------------------------------------------- step
    def _loss_as_stock(self, loss: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
        """Normalise a `compute_loss` result exactly as the stock `training_step` does before backward."""
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled_for_ga:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    # ------------------------------------------------------------------------- the ascent host (`AscentHost`)
    @property
    def schedule(self) -> AscentSchedule:
        """Which optimizer steps are SAM steps, and the kept vector of S (`hf_lwsam.schedule.AscentSchedule`)."""
        return self._schedule

    def sam_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The selected parameters S of the current step, by name as in `model.named_parameters()` (under FSDP2 the
        sharded parameters); resolved once per selection."""
        return self._sam_parameters()

    def ascent_gradient(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
        named: list[tuple[str, nn.Parameter]] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | float]:
        """Pass 1 of a two-pass ascent, at w: the clean loss and g_S, through a backward truncated at S. Leaves `.grad`
        untouched. By default it never all-reduces (each process perturbs with its own micro-batch gradient); with
        `sam_sync_perturbation`, and always under FSDP2, g_S is averaged over the processes. Under FSDP2 g_S is taken
        with respect to the unsharded parameters the forward uses (`sharding.capture_unsharded`), and this process's
        shards of it are returned.

        It opens what `pass_at(..., after_pass_one=True)`, pass 2, closes: the random state (pass 2 draws the same
        dropout masks, so e_S is evaluated where it was computed), the running statistics (a module's buffers stay as
        pass 1 left them) and, with `sam_reuse_activations`, the kept activations of the blocks below S.

        Args:
            model (`nn.Module`): the model `training_step` got.
            inputs (`dict`): the micro-batch's prepared inputs (shallow-copied: a `compute_loss` may pop from them).
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): as `training_step` got it.
            named (`list[tuple[str, nn.Parameter]]`, *optional*, defaults to `sam_parameters()`): S.

        Returns:
            `tuple`: the clean loss (detached, normalised as the stock step normalises it), g_S (one tensor per
            parameter, in the loss scale under fp16) and that loss scale (`1.0` without one; a device tensor).
        """
        named = self.sam_parameters() if named is None else named
        params = [p for _, p in named]
        self._end_pass_one()  # a pass 1 that no pass 2 followed
        reuse = self._activation_reuse(params)
        rng = capture_rng()
        self._buffer_guard.mark()
        stack = ExitStack()
        self._pass_one = (stack, reuse, rng)
        if reuse is not None:
            stack.enter_context(reuse.session())
            reuse.record()  # keep the outputs of the blocks below the cut, graph included
        stack.callback(self._buffer_guard.restore)  # after pass 2: the buffers as pass 1 left them
        loss, grads, scale = self._pass_one_gradient(model, copy.copy(inputs), num_items_in_batch, named)
        self._buffer_guard.keep_pass_one()  # running statistics: pass 1's update is the step's only one
        # Pass 1's loss is gone here; autograd.grad freed what it traversed, and only the kept lower blocks' graph
        # (reuse) survives.
        return loss, grads, scale

    def _end_pass_one(self) -> None:
        """Close what `ascent_gradient` opened (after pass 2, or when a step ends without one): the running statistics
        back as pass 1 left them, the reuse wrappers removed (reuse turned off if pass 2 did not match pass 1)."""
        if self._pass_one is None:
            return
        stack, reuse, _ = self._pass_one
        self._pass_one = None
        stack.close()
        if reuse is not None and reuse.mismatch:
            self._disable_reuse(reuse.mismatch)

    def ascent_direction(
        self, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """e_S = rho g_S / ||g_S|| (ASAM's form with `sam_adaptive`) on this process's shards of `params` (under FSDP2
        the norm is summed over the processes' shards, each shard once under HSDP: `sharding.sum_over_shards`); see
        `sam.ascent_direction`.

        Args:
            params (`list[torch.Tensor]`): S (e.g. from `sam_parameters()`).
            grads (`list[torch.Tensor]`): g_S on this process's shards of `params` (as `ascent_gradient` returns it);
                consumed (e_S is computed in their storage).

        Returns:
            `tuple`: the steps e_S (for `pass_at`), the norm they were scaled from (in the loss scale of `grads`), and
            whether it is finite (a device bool: e_S is 0 where it is not).
        """
        return ascent_direction(local(params), grads, self.args.sam_rho, self.args.sam_adaptive,
                                sum_across=sum_over_shards(params))

    def _pass_one_gradient(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any, named: list[tuple[str, nn.Parameter]]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | float]:
        """`ascent_gradient`'s loss and truncated backward."""
        params = [p for _, p in named]
        sharded = is_sharded(params)
        # TRL's SFT/DPO run their step inside an activation-offload context; pass 1 runs inside it too.
        offload = getattr(self, "maybe_activation_offload_context", None) or nullcontext()
        capture = capture_unsharded(self.accelerator.unwrap_model(model), named) if sharded else nullcontext()
        with self.accelerator.no_sync(model), offload, capture as captured:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            loss = self._loss_as_stock(loss, num_items_in_batch)
            scaler = getattr(self.accelerator, "scaler", None)
            # fp16: differentiate the scaled loss so small gradients don't underflow; e_S is scale-free.
            target = scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss
            grads = gradient_of(target, named, captured)
        if (self.args.sam_sync_perturbation or sharded) and self.accelerator.num_processes > 1:
            grads = all_reduce_mean(grads)
        if sharded:
            grads = shards_of(grads, params)  # this process's piece of the common g_S
        # The scale as a device tensor (`get_scale()` would synchronise): g_S's norm is logged unscaled.
        scale = scaler._get_scale_async() if target is not loss else 1.0
        return loss.detach(), grads, scale

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor | Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One micro-batch: on a SAM step, ascent on S, the base step at w + e_S, then S restored; on any other step
        (`sam_start`, `sam_interval`), exactly the base step, plus LookSAM's kept component on the window's last
        micro-batch with `sam_interval_reuse="looksam"`.

        Returns the loss the base step would log: the clean (unperturbed) loss with `sam_ascent="exact"`, the perturbed
        one with the one-pass ascents (`"stale"`, `"random"`, `"momentum"`: there is no clean pass), normalised as the
        base step normalises it (`hf_lwsam.ascent`).
        """
        self._micro_batch_started = time.perf_counter()
        # The stock step's prologue, once, before either pass and, as in the stock step, before `_prepare_inputs`
        # (GRPO generates there, in training mode only): an optimizer with train()/eval() (schedule-free) moves the
        # weights back from their evaluation point here, so S is perturbed and restored at the training point.
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        # Once per micro-batch, at w: TRL's can be stateful (GRPO generates, scores and buffers completions here).
        inputs = self._prepare_inputs(inputs)
        if self._default_selection_untraced:
            self._trace_default_selection(model, copy.copy(inputs))
        looksam = None  # LookSAM's S on a step between SAM steps: the one this backward ran with
        sam_step = self._schedule.is_sam_step(self.state.global_step, self.state.max_steps)
        if sam_step and self.args.sam_rho > 0:
            inputs = self._sampling_log_probs(model, inputs)
        if not sam_step:
            with self._inputs_already_prepared():
                self._time_before_base_step()
                loss = super().training_step(model, inputs, num_items_in_batch)  # the stock step, bit for bit
            if self._schedule.is_looksam_step(self.state.global_step, self.state.max_steps):
                looksam = self._sam_parameters()
            else:
                self.record_plain_step()
        else:
            try:  # `hf_lwsam.ascent`: where e_S comes from; the trainer is its host (`AscentHost`)
                loss = self._ascent.step(self, model, inputs, num_items_in_batch)
            except BaseException:  # the window starts over (an out-of-memory retry): LookSAM's sum of its clean
                self._schedule.pop_clean()  # gradients keeps none of the failed micro-batches
                raise
            finally:
                self._end_pass_one()
        if self._selection.changes_during_training:  # e.g. a probe step's last micro-batch: rank, re-select
            self._selection.after_micro_batch()  # it reads .grad before LookSAM's component is added to it
        if looksam is not None:
            self._add_looksam_component(looksam)
        return loss

    @torch.no_grad()
    def _sampling_log_probs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """TRL's GRPO on-policy (no `old_per_token_logps` in the batch): its loss then takes the pass's own detached
        log-probabilities as the old ones, which at w + e_S makes every importance ratio 1 and the clipping inert. The
        sampling policy's log-probabilities, at w, are put in the batch instead (one forward without gradient, TRL's
        own `_get_per_token_logps_and_entropies`), as TRL's buffered case has them: both passes weigh the same
        completions against the policy that sampled them. Any other batch is returned as it is."""
        if (not hasattr(self, "_get_per_token_logps_and_entropies") or "completion_ids" not in inputs
                or "advantages" not in inputs or inputs.get("old_per_token_logps") is not None):
            return inputs
        completion = inputs["completion_ids"]
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], completion], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), completion.size(1),
            **{name: inputs.get(name) for name in (*_GRPO_IMAGE_INPUTS, "num_images", "num_tiles")})
        return {**inputs, "old_per_token_logps": logps}

    # ------------------------------------------------------------------------------------------------- LookSAM
    def _add_looksam_component(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """A step between SAM steps: on the window's last micro-batch, after its backward (DDP has all-reduced `.grad`,
        so every process adds the same) and before the stock clipping and optimizer step, `.grad` of S becomes
        `g + alpha * ||g|| / ||g_v|| * g_v` (norms over the whole of S; fp16: both in the loss scale), `named` the S
        this backward ran with (added after a probe step has read the clean `.grad`). Nothing is added without a g_v
        for that S (before the first SAM step, or after a probe changed S)."""
        self._sam_window.setdefault("micro_batches", 0)
        if not self.accelerator.sync_gradients:
            return
        kept = self._schedule.direction([n for n, _ in named])
        if kept is None:
            return
        params = [p for _, p in named]
        for p in params:
            if p.grad is None:  # a parameter of S without a gradient this window: g = 0 there
                p.grad = torch.zeros_like(p)
        added = looksam_add_([p.grad for p in params], kept, self.args.sam_looksam_alpha)
        self._sam_window["looksam_steps"] = self._sam_window.get("looksam_steps", 0.0) + added.float()

    # ---------------------------------------------------------------------------------------- the perturbed pass
    def pass_at(self, tensors: list[torch.Tensor], steps: list[torch.Tensor], model: nn.Module,
                inputs: dict[str, Any], num_items_in_batch: Any, after_pass_one: bool = False,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """The base class's step (one forward and backward, into `.grad`) at `tensors + steps`, with `tensors` restored
        bit-exactly afterwards, also when the step raises. Every ascent's perturbed pass runs here; `pass_at([], [],
        ...)` is exactly the base step.

        Args:
            tensors (`list[torch.Tensor]`): what to perturb, e.g. S from `sam_parameters()` (under FSDP2 this
                process's shards of them are perturbed).
            steps (`list[torch.Tensor]`): e, one tensor per tensor (shaped as its local shard); consumed: the list is
                emptied, so e is freed before the pass.
            model (`nn.Module`), inputs (`dict`), num_items_in_batch: as `training_step` got them (`inputs` is
                shallow-copied: a `compute_loss` may pop from it).
            after_pass_one (`bool`, *optional*, defaults to `False`): this is pass 2 of a two-pass ascent, after
                `ascent_gradient`: it draws pass 1's random state, replays pass 1's kept activations, keeps the
                running statistics as pass 1 left them, and undoes what its `compute_loss` records as a side effect
                (metrics and token counts come from the clean pass 1).
            scale (`torch.Tensor`, *optional*): a 0-dim factor: the step is `steps * scale` (in each tensor's dtype),
                and none where it is 0 (`steps` may then be non-finite); `steps` are then only read, and their
                product is formed only inside w + e (Momentum-SAM: m_S and -rho / ||m_S||, `sam.momentum_scale`).

        Returns:
            `torch.Tensor`: the loss the base step returns (at the perturbed point).
        """
        tensors = local(tensors)
        if len(tensors) != len(steps):
            raise ValueError(f"pass_at got {len(tensors)} tensors but {len(steps)} steps: give one step per tensor.")
        if after_pass_one:
            if self._pass_one is None:
                raise ValueError("pass_at(..., after_pass_one=True) is pass 2 of a two-pass ascent: call "
                                 "ascent_gradient (pass 1) first, or pass after_pass_one=False.")
            _, reuse, rng = self._pass_one
            restore_rng(rng)  # pass 2 draws the same dropout masks as pass 1: e_S is evaluated where it was computed
            if reuse is not None:
                reuse.replay()
        try:
            perturbation = Perturbation.apply(tensors, steps, scale)
            steps.clear()  # the caller's list: free e before the pass
            try:
                with (self._inputs_already_prepared(),
                      self._records_from_pass_one() if after_pass_one else nullcontext()):
                    self._time_before_base_step()
                    return super().training_step(model, copy.copy(inputs), num_items_in_batch)
            finally:
                perturbation.restore()
        finally:
            if after_pass_one:
                self._end_pass_one()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The base class's `train`; when it raises (which skips `on_train_end`), a [`PreemptionCallback`] puts the
        signal handlers back, so a SIGTERM after the failure is not swallowed."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, PreemptionCallback):
                    callback.restore_signal_handlers()
            raise

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """The base class's, but none once `max_steps` is reached: resumed from a checkpoint of the last step, part-way
        through an epoch, the stock loop (transformers 5.x) takes one more optimizer step before it checks the limit
        (the run ends at `max_steps + 1`, unlike the uninterrupted one); with no batch it stops where it was."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The base class's optimizer, checked by the ascent before the first step (the momentum ascent reads its
        first moment, or hooks its own average of the gradients to the optimizer's step)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        self._ascent.prepare(self, self.optimizer)
        return optimizer

    def _save_rng_state(self, output_dir: str) -> None:
        """Checkpoints also carry the kept vector (the stale ascent's gradient of S, or LookSAM's g_v) and a running
        probe's sums (both written before `trainer_state.json`, which marks a checkpoint complete)."""
        super()._save_rng_state(output_dir)
        if self._schedule.keeps_state and (self.args.should_save or self._schedule.per_process):
            # the stale gradient, LookSAM's g_v or Momentum-SAM's own m; FSDP2's shards: each process writes its own
            self._schedule.save(output_dir, self.args.process_index, self.args.world_size, self._named_parameters())
            if self._schedule.per_process:  # every process's file is written before process 0 marks the checkpoint
                self.accelerator.wait_for_everyone()  # complete (trainer_state.json, after this method returns)
        self._selection.on_save()  # e.g. a running probe's sums, read from the device at checkpoint time

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self._schedule.keeps_state:
            self._schedule.load(checkpoint, self.args.device, self.args.process_index, self.args.world_size,
                                self._named_parameters())

    def _named_parameters(self) -> dict[str, nn.Parameter]:
        """The model's parameters by name, the sharded ones under FSDP2 (`sharding.reshard`)."""
        reshard(self.model)
        return dict(self.model.named_parameters())

    @contextmanager
    def _instance_attribute(self, name: str, value: Any) -> Iterator[None]:
        """`self.<name> = value` for the block, then the instance's own attribute put back as it was (one a user set
        on the trainer, e.g. a `compute_loss`, stays set), or removed when it had none."""
        saved = vars(self).get(name, _MISSING)
        setattr(self, name, value)
        try:
            yield
        finally:
            if saved is _MISSING:
                delattr(self, name)
            else:
                setattr(self, name, saved)

    def _inputs_already_prepared(self) -> AbstractContextManager[None]:
        """The base step's own `_prepare_inputs` call passes the prepared inputs through."""
        return self._instance_attribute("_prepare_inputs", lambda prepared: prepared)

    def _time_before_base_step(self) -> None:
        """TRL's GRPO times its own `training_step` into `step_time`: add what this micro-batch spent before it
        (generation in `_prepare_inputs`, the exact ascent's pass 1), so `step_time` is the whole step's, as in GRPO."""
        if isinstance(getattr(self, "_current_train_step_time", None), float):
            self._current_train_step_time += time.perf_counter() - self._micro_batch_started

    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The model's keyword arguments in a prepared batch (for the default selection's traced forward). TRL's GRPO
        batches hold prompt and completion apart (`prompt_ids`, `completion_ids` and their masks): joined, as its loss
        joins them, with the image inputs its loss passes for the whole batch."""
        if "prompt_ids" in inputs and "completion_ids" in inputs and "input_ids" not in inputs:
            joined = {"input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                      "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)}
            return {**joined, **{k: inputs[k] for k in _GRPO_IMAGE_INPUTS if inputs.get(k) is not None}}
        return inputs

    @contextmanager
    def _records_from_pass_one(self) -> Iterator[None]:
        """Undo what pass 2's `compute_loss` records as a side effect (TRL: `_metrics` lists, `_total_train_tokens`):
        metrics and token counts come from the clean pass 1 only, as in plain training. What the base `training_step`
        records outside `compute_loss` (GRPO's `step_time`) is kept."""
        compute_loss = self.compute_loss

        def undone(*args: Any, **kwargs: Any) -> Any:
            with self._compute_loss_records_undone():
                return compute_loss(*args, **kwargs)

        with self._instance_attribute("compute_loss", undone):
            yield

    @contextmanager
    def _compute_loss_records_undone(self) -> Iterator[None]:
        metrics = getattr(self, "_metrics", None)
        saved = {mode: {k: list(v) for k, v in m.items()} for mode, m in metrics.items()} if isinstance(
            metrics, dict) else None
        tokens = getattr(self, "_total_train_tokens", None)
        try:
            yield
        finally:
            if saved is not None:
                for mode, recorded in metrics.items():
                    recorded.clear()
                    recorded.update(saved.get(mode, {}))
            if tokens is not None:
                self._total_train_tokens = tokens

    # ------------------------------------------------------------------------------------------------- logging
    def record_sam_step(self, clean: torch.Tensor | None, perturbed: torch.Tensor, norm: torch.Tensor,
                        finite: torch.Tensor, e_norm: torch.Tensor | None = None) -> None:
        """Add a SAM micro-batch to the logging window's sums (`sam/*`), on the device (no host synchronisation until
        logging); on the window's last micro-batch, count a SAM optimizer step.

        Args:
            clean (`torch.Tensor`, *optional*): the clean loss at w (`None` for a one-pass ascent: no `sam/sharpness`).
            perturbed (`torch.Tensor`): the loss at w + e_S (`pass_at`'s).
            norm (`torch.Tensor`): the norm e_S was scaled from (`sam/grad_norm_selected`, unscaled).
            finite (`torch.Tensor`): whether it was finite (a device bool; a non-finite one counts in `sam/skipped`).
            e_norm (`torch.Tensor`, *optional*): ||e_S|| where known (`sam/e_norm`).
        """
        w = self._sam_window
        if clean is not None:
            w["clean"] = w.get("clean", 0.0) + clean.detach().float()
            w["exact_micro_batches"] = w.get("exact_micro_batches", 0) + 1
        w["perturbed"] = w.get("perturbed", 0.0) + perturbed.detach().float()
        w["grad_norm"] = w.get("grad_norm", 0.0) + torch.where(finite, norm.float(), 0.0)
        w["skipped"] = w.get("skipped", 0.0) + (~finite).float()
        if e_norm is not None:
            w["e_norm"] = w.get("e_norm", 0.0) + e_norm.float()
        w["micro_batches"] = w.get("micro_batches", 0) + 1
        if self.accelerator.sync_gradients:
            w["sam_steps"] = w.get("sam_steps", 0) + 1

    def record_plain_step(self) -> None:
        """A micro-batch without a perturbation (`sam_interval`, or a SAM step of an ascent with nothing to perturb
        with yet) only counts towards the logging window."""
        self._sam_window.setdefault("micro_batches", 0)

    def record_window(self, key: str, value: Any) -> None:
        """Add `value` (a number or a device tensor) to the logging window's sum `key`: `sam_steps` (the SAM optimizer
        steps, `sam/sam_steps`), `looksam_sin` and `looksam_kept` (`sam/looksam_sin`, their ratio)."""
        self._sam_window[key] = self._sam_window.get(key, 0) + value

    def _window_metrics(self) -> dict[str, float]:
        """`sam/*` over the logging window (one host sync, here): losses per SAM step on the scale of the stock `loss`,
        summed over processes then averaged; `sam/sam_steps` counts this process's SAM optimizer steps."""
        w, self._sam_window = self._sam_window, {}
        keys = ("clean", "perturbed", "grad_norm", "skipped", "micro_batches", "exact_micro_batches", "e_norm")
        sums = torch.stack([torch.as_tensor(w.get(k, 0.0), dtype=torch.float32, device=self.args.device).reshape(())
                            for k in keys])
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")  # totals over processes
        clean, perturbed, grad_norm, skipped, micro_batches, exact, e_norm = sums.tolist()
        sam_steps = w.get("sam_steps", 0)
        logs = {"sam/sam_steps": float(sam_steps)}
        if "looksam_steps" in w:  # this process's steps between that added LookSAM's component
            logs["sam/looksam_steps"] = float(w["looksam_steps"])
        if "looksam_kept" in w:  # mean over this window's SAM steps (g_v is the same on every process)
            logs["sam/looksam_sin"] = round(float(w["looksam_sin"]) / w["looksam_kept"], 6)
        per_step = max(sam_steps, 1) * self.accelerator.num_processes  # mean over processes, per optimizer step
        if micro_batches:  # SAM micro-batches were recorded: the loss at w + e_S
            logs["sam/loss_perturbed"] = round(perturbed / per_step, 4)
        if exact:  # exact SAM steps have both losses
            logs["sam/sharpness"] = round((perturbed - clean) / per_step, 6)
        if "e_norm" in w:  # ||e_S||, mean over SAM micro-batches (0 on a skipped one)
            logs["sam/e_norm"] = round(e_norm / max(micro_batches, 1e-12), 6)
        if micro_batches:
            logs.update({"sam/grad_norm_selected": round(grad_norm / max(micro_batches - skipped, 1e-12), 6),
                         "sam/skipped": skipped})  # micro-batches, counted over all processes
        logs["sam/num_perturbed_layers"] = float(self.num_perturbed_layers)
        logs.update(self._selection.window_metrics())  # e.g. the probe's selection changes in this window
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the `sam/*` window averages to the training logs, then log as the stock `Trainer` does."""
        if "loss" in logs and self._sam_window:
            logs.update(self._window_metrics())
        super().log(logs, start_time)



class LWSAMTrainer(LWSAMMixin, Trainer):
    r"""
    A drop-in [`~transformers.Trainer`] that trains with layer-wise sharpness-aware minimization: [`LWSAMMixin`] plus
    `Trainer`.

    With the default exact ascent every micro-batch of a SAM step takes two passes: the ascent gradient g_S of the
    selected parameters S at w (a truncated backward that leaves `.grad` alone), then the stock `training_step` at
    w + e_S, after which S is restored bit-exactly; the one-pass ascents (`sam_preset="free"`: Momentum-SAM) run only
    the second. The optimizer, scheduler, clipping and checkpointing are the stock ones.

    Args:
        args ([`LWSAMConfig`] or [`~transformers.TrainingArguments`], *optional*):
            Training options; a plain `TrainingArguments` is converted to `LWSAMConfig` with the SAM defaults.
        *other arguments*: as for [`~transformers.Trainer`].
    """


_TRAINER_CLASSES: dict[type, type] = {}


def lwsam_trainer(trainer_cls: type[Trainer]) -> type[Trainer]:
    """The LW-SAM subclass of `trainer_cls` ([`LWSAMMixin`] first among its bases); the same class object on repeated
    calls, `trainer_cls` itself when it already is one, [`LWSAMTrainer`] for `Trainer`.

    Args:
        trainer_cls (`type`): a `Trainer` subclass, e.g. `trl.SFTTrainer`.
    """
    return mixed_subclass(LWSAMMixin, trainer_cls, (Trainer, LWSAMTrainer), "Trainer", _TRAINER_CLASSES,
                          "with layer-wise SAM steps")
