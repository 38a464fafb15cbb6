"""Automatic layer selection by gradient-norm probing (`sam_selection="probe"`).

The paper's method perturbs the few layers whose gradient norms are largest, measured during training. A *layer* is a
module that directly owns trainable parameters; every parameter counts once, for the first candidate layer (in
`model.named_modules()` order) that owns it, so GPT-2's `lm_head` tied to `transformer.wte` is not a layer of its own.

    score_l = ||g_l||_2                       (metric "grad_norm")
    score_l = ||g_l||_2 / sqrt(numel_l)       (metric "grad_norm_per_param", the RMS gradient entry)
    score_l = ||g_l||_2 / c_l                 (metric "grad_norm_per_cost"; c_l: `recompute_costs`)
    S       = the k candidates with the largest score (ties: the output-side one first), in depth order

A *candidate* is one layer (`sam_probe_granularity="layer"`) or, at `"block"` granularity, one transformer block
(all its layers; `||g_B||^2` is the sum of its layers' `||g_l||^2`) or one layer after the trunk, with the input side
(embeddings) left out unless `sam_target_layers` names it. `c_l` is the share of the model's compute that perturbing
the candidate puts in the second pass (everything from it to the output, by parameter count), so a candidate deep in
the stack must have a proportionally larger gradient to be chosen.

In the trainer a probe costs no extra pass: on a probe step it reads the per-layer norms of `.grad` right after
pass 2 of the accumulation window's last micro-batch (the gradient of the window's loss at w + e), all-reduces the
per-layer squared norms (one small vector) and ranks them. `probe_layer_grad_norms` is the stand-alone version at w.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from .selection import Pattern, _example_names, is_block_list, name_matches, select_layers
from .sharding import is_sharded, local

logger = logging.get_logger(__name__)

METRICS = ("grad_norm", "grad_norm_per_param", "grad_norm_per_cost")
GRANULARITIES = ("block", "layer")
STATE_KEY = "LWSAMLayerProbe"  # the entry in `TrainerState.stateful_callbacks` (saved in trainer_state.json)


# ------------------------------------------------------------------------------------------------- candidates
def owned_parameters(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters owned directly by each layer, each parameter under its first owner, in depth order.

    Args:
        model (`nn.Module`): the model.
        layers (`Sequence[str]`, *optional*): restrict to these module names (default: every module).

    Returns:
        `{layer name: [parameters]}` for the layers that own at least one trainable parameter not owned earlier.
    """
    wanted = None if layers is None else set(layers)
    seen: set[int] = set()
    owned: dict[str, list[nn.Parameter]] = {}
    for name, module in model.named_modules():
        if not name or (wanted is not None and name not in wanted):
            continue
        params = []
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if params:
            owned[name] = params
    return owned


def candidate_layers(model: nn.Module, target_layers: Pattern = None, exclude_layers: Pattern = None) -> list[str]:
    """The layers the probe ranks: every layer, or those under `target_layers`, minus those under `exclude_layers`.

    Same matching rules as `select_layers` (PEFT `target_modules` semantics); depth order.

    Raises:
        `ValueError`: when a pattern matches no module or nothing trainable is left.
    """
    if target_layers is not None:
        names = select_layers(model, target_layers, exclude_layers)
    else:
        names = list(owned_parameters(model))
        if exclude_layers is not None:
            excluded = [n for n, _ in model.named_modules() if n and name_matches(n, exclude_layers)]
            if not excluded:
                raise ValueError(
                    f"sam_exclude_layers={exclude_layers!r} matches no module of {type(model).__name__}. Real layer "
                    f"names look like {_example_names(model)}."
                )
            names = [n for n in names if not any(n == e or n.startswith(e + ".") for e in excluded)]
    layers = list(owned_parameters(model, names))
    if not layers:
        raise ValueError(
            f"sam_selection='probe' has no candidate layer: sam_target_layers={target_layers!r} / "
            f"sam_exclude_layers={exclude_layers!r} leave no module with trainable parameters of its own. "
            "Widen sam_target_layers or narrow sam_exclude_layers."
        )
    return layers


def block_roots(model: nn.Module) -> list[str]:
    """The blocks of every repeated-block list: the children of each outermost `nn.ModuleList` of >= 2 same-class
    modules (GPT-2 `transformer.h.3`, BERT `encoder.layer.5`, T5's encoder and decoder blocks, also under PEFT)."""
    roots: list[str] = []
    for name, module in model.named_modules():
        if not is_block_list(module):
            continue
        if any(name.startswith(r + ".") for r in roots):
            continue  # a list inside a block (e.g. a block's experts) is part of that block
        roots += [f"{name}.{i}" for i in range(len(module))]
    return roots


def _input_side(model: nn.Module, name: str, first_block: int, position: dict[str, int]) -> bool:
    """Embeddings and what runs with them: registered before the first block, an `nn.Embedding`, or named *embed*."""
    module = model.get_submodule(name)
    return position[name] < first_block or isinstance(module, nn.Embedding) or "embed" in name.rsplit(".", 1)[-1]


def candidate_units(
    model: nn.Module, target_layers: Pattern = None, exclude_layers: Pattern = None, granularity: str = "block"
) -> dict[str, list[str]]:
    """The probe's candidates, `{candidate name: [layers]}` in depth order.

    `"layer"`: every candidate layer (see `candidate_layers`) on its own. `"block"`: each block of the repeated-block
    lists as one candidate, plus each layer outside them; without `target_layers`, the input side (embeddings and
    what is registered before the first block) is left out: its summed gradient ranks high while perturbing it
    recomputes the whole model. A model without repeated blocks falls back to layers.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"sam_probe_granularity={granularity!r} is unknown: use one of {', '.join(map(repr, GRANULARITIES))}."
        )
    layers = candidate_layers(model, target_layers, exclude_layers)
    blocks = block_roots(model)
    if granularity == "layer" or not blocks:
        return {layer: [layer] for layer in layers}
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    first_block = position[blocks[0]]
    units: dict[str, list[str]] = {}
    for layer in layers:
        root = next((b for b in blocks if layer == b or layer.startswith(b + ".")), layer)
        if root == layer and target_layers is None and _input_side(model, layer, first_block, position):
            continue
        units.setdefault(root, []).append(layer)
    if not units:
        raise ValueError(
            f"sam_selection='probe' with sam_probe_granularity='block' has no candidate outside the input side of "
            f"{type(model).__name__}: name the layers with sam_target_layers or use sam_probe_granularity='layer'."
        )
    return units


def recompute_costs(model: nn.Module, units: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """Each candidate's share of the model's compute that perturbing it puts in the second pass: the parameters
    (frozen and tied ones included, `nn.Embedding` lookups excluded: they do no matmul) of every module registered at
    or after the candidate's first layer, divided by the model's total. A proxy for FLOPs per token."""
    sizes = [(name, 0 if isinstance(m, nn.Embedding) else sum(p.numel() for p in m.parameters(recurse=False)))
             for name, m in model.named_modules()]
    position = {name: i for i, (name, _) in enumerate(sizes)}
    suffix = [0] * (len(sizes) + 1)
    for i in range(len(sizes) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + sizes[i][1]  # compute from module i to the output
    total = max(suffix[0], 1)
    return torch.tensor([suffix[min(position[layer] for layer in layers)] / total for layers in units.values()],
                        dtype=torch.float64)


def resolve_top_k(num_candidates: int, top_k: int = 2, top_ratio: float | None = None) -> int:
    """How many layers a probe selects: `ceil(top_ratio * num_candidates)` when `top_ratio` is set (it wins over
    `top_k`), else `top_k`; at most `num_candidates`, at least 1."""
    k = math.ceil(top_ratio * num_candidates) if top_ratio is not None else top_k
    return max(1, min(k, num_candidates))


def scores(squared: torch.Tensor, numels: torch.Tensor, metric: str, costs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-candidate scores from per-candidate squared gradient norms (`costs`: see `recompute_costs`)."""
    if metric not in METRICS:
        raise ValueError(f"sam_probe_metric={metric!r} is unknown: use one of {', '.join(map(repr, METRICS))}.")
    norms = squared.double().clamp_min(0).sqrt()  # ||g_l||_2
    if metric == "grad_norm_per_param":
        norms = norms / numels.double().sqrt()  # ||g_l||_2 / sqrt(n_l): RMS entry, size-independent
    elif metric == "grad_norm_per_cost":
        if costs is None:
            raise ValueError("sam_probe_metric='grad_norm_per_cost' needs the candidates' recompute costs.")
        norms = norms / costs.to(norms.device).clamp_min(1e-12)  # a deep candidate must earn its recompute
    return norms


def rank_layers(norms: Mapping[str, float], k: int) -> list[str]:
    """The `k` layers with the largest norm, returned in the mapping's (depth) order. Ties go to the deeper layer."""
    names = list(norms)
    order = sorted(range(len(names)), key=lambda i: (-norms[names[i]], -i))  # largest first, then output side
    chosen = set(order[:k])
    return [n for i, n in enumerate(names) if i in chosen]


# ---------------------------------------------------------------------------------------- stand-alone probe
def _default_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "probe_layer_grad_norms: the model returned no loss; include labels in the batches or pass loss_fn."
        )
    return loss


def probe_layer_grad_norms(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    metric: str = "grad_norm",
    *,
    layers: Sequence[str] | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
) -> dict[str, float]:
    r"""
    Per-layer norms of the gradient of the mean loss over `batches`, at the current weights.

    Uses `torch.autograd.grad`, so no `.grad` and no weight is touched; the model is used in its current mode (call
    `model.train()` first for training-time gradients, dropout included).

    Args:
        model (`nn.Module`): a model whose output has a `loss` (batches include labels), or see `loss_fn`.
        batches (iterable of `dict`): input batches, already on the model's device.
        metric (`str`, *optional*, defaults to `"grad_norm"`):
            `"grad_norm"`: `||g_l||_2`; `"grad_norm_per_param"`: `||g_l||_2 / sqrt(numel_l)`; `"grad_norm_per_cost"`:
            `||g_l||_2 / c_l` (see `recompute_costs`).
        layers (`Sequence[str]`, *optional*): restrict to these layers (default: every layer, see `owned_parameters`).
        loss_fn (`Callable`, *optional*): `loss_fn(model, batch) -> scalar loss`; default `model(**batch).loss`.

    Returns:
        `dict[str, float]`: layer name -> norm, in depth order.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown: use one of {', '.join(map(repr, METRICS))}.")
    owned = owned_parameters(model, layers)
    params = [p for ps in owned.values() for p in ps]
    loss_fn = loss_fn or _default_loss
    total: list[torch.Tensor] | None = None
    count = 0
    for batch in batches:
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        total = grads if total is None else [t + g for t, g in zip(total, grads)]  # sum_b grad L_b
        count += 1
    if total is None:
        raise ValueError("probe_layer_grad_norms: `batches` is empty; pass at least one batch.")
    squared = torch.stack([(t.double() / count).pow(2).sum() for t in total])  # ||grad of mean loss||^2 per tensor
    per_layer, numels = _per_layer(owned, squared)
    costs = recompute_costs(model, {name: [name] for name in owned}) if metric == "grad_norm_per_cost" else None
    return dict(zip(owned, scores(per_layer, numels, metric, costs).tolist()))


def _per_layer(owned: Mapping[str, list[nn.Parameter]], per_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-tensor squared norms into per-layer ones; also the per-layer parameter counts."""
    index = torch.tensor([i for i, ps in enumerate(owned.values()) for _ in ps], device=per_tensor.device)
    per_layer = torch.zeros(len(owned), dtype=per_tensor.dtype, device=per_tensor.device)
    per_layer.index_add_(0, index, per_tensor)  # ||g_l||^2 = sum over the layer's tensors of ||g_t||^2
    numels = torch.tensor([sum(p.numel() for p in ps) for ps in owned.values()], dtype=torch.float64)
    return per_layer, numels


def grad_squared_norms(owned: Mapping[str, list[nn.Parameter]]) -> torch.Tensor:
    """Per-layer `||.grad||^2` in float32 (a missing `.grad` counts as 0): one fused norm kernel, no host sync."""
    params = [p for ps in owned.values() for p in ps]
    device = params[0].device
    grads = local([p.grad for p in params if p.grad is not None])  # FSDP2: this process's shards (summed by caller)
    norms = torch._foreach_norm([g.float() for g in grads]) if grads else []
    it = iter(norms)
    per_tensor = torch.stack([next(it) if p.grad is not None else torch.zeros((), device=device) for p in params])
    return _per_layer(owned, per_tensor.float().to(device).pow(2))[0]


# ------------------------------------------------------------------------------------------- trainer state
class LayerProbe(TrainerCallback):
    r"""
    The probed selection of an [`LWSAMTrainer`] and its schedule; a callback so that it can restore itself when
    training resumes from a checkpoint.

    Schedule: optimizer step `s` (0-based, `state.global_step` while it runs) is a probe step when
    `s % sam_probe_interval < n` (`sam_probe_interval=0`: `s < n`), with `n = ceil(sam_probe_batches /
    gradient_accumulation_steps)` windows per probe. A probe averages the per-layer squared norms of its windows'
    gradients, ranks, and the new selection applies from step `s + 1`. Before the first probe the selection is the `k`
    output-most candidates.

    The state (selection, pending sums, probe count) is written to `trainer.state.stateful_callbacks[STATE_KEY]`
    whenever it changes, so every checkpoint's `trainer_state.json` carries it; `on_train_begin` restores it when
    training resumes (`state.global_step > 0`).
    """

    def __init__(self, trainer: Any):
        self._trainer = weakref.ref(trainer)
        args = trainer.args
        self.units = candidate_units(trainer.model, args.sam_target_layers, args.sam_exclude_layers,
                                     args.sam_probe_granularity)
        self.candidates = list(self.units)
        self.costs = recompute_costs(trainer.model, self.units)
        self.k = resolve_top_k(len(self.candidates), args.sam_top_k, args.sam_top_ratio)
        requested = args.sam_top_k if args.sam_top_ratio is None else None
        if requested is not None and requested > len(self.candidates):
            logger.warning(
                f"sam_top_k={requested} exceeds the {len(self.candidates)} probe candidates: every candidate is "
                "selected."
            )
        self._owned: dict[str, list[nn.Parameter]] | None = None
        self.history: list[tuple[int, list[str]]] = []  # (step, selection) of every completed probe, this process
        self.last_norms: dict[str, float] = {}
        self.changes_in_window = 0
        self.reset()

    # -- state -------------------------------------------------------------------------------------------------
    def selected_layers(self) -> list[str]:
        """The layers of the selected candidates, in depth order (what the trainer perturbs)."""
        return [layer for name in self.selection for layer in self.units[name]]

    def initial_selection(self) -> list[str]:
        """The `k` output-most candidates: the selection before the first probe."""
        return self.candidates[-self.k :]

    def reset(self) -> None:
        self.selection = self.initial_selection()
        self.pending: list[float] | None = None  # per-layer squared-norm sums of the running probe
        self.pending_windows = 0
        self.num_probes = 0
        self.last_probe_step = -1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (a running probe's device sums are read here: at checkpoint time, not in the step)."""
        pending = self.pending.tolist() if isinstance(self.pending, torch.Tensor) else self.pending
        windows = self.pending_windows
        return {
            "candidates": list(self.candidates), "k": self.k, "selection": list(self.selection),
            "pending": pending, "pending_windows": int(windows) if isinstance(windows, torch.Tensor) else windows,
            "num_probes": self.num_probes,
            "last_probe_step": self.last_probe_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved `state_dict()`; one that does not fit this model and options is logged and not used
        (probing starts afresh from the initial selection)."""
        reason = self._unfit_reason(state)
        if reason is not None:
            logger.warning(f"The checkpoint's probe state does not fit this model ({reason}); probing starts afresh.")
            self.reset()
            return
        self.selection = list(state["selection"])
        self.pending, self.pending_windows = state["pending"], state["pending_windows"]
        self.num_probes, self.last_probe_step = state["num_probes"], state["last_probe_step"]
        logger.info(f"LW-SAM probe state restored (last probe at step {self.last_probe_step}): "
                    f"{', '.join(self.selection)}")

    def _unfit_reason(self, state: Mapping[str, Any]) -> str | None:
        """Why a saved probe state cannot be restored here, `None` when it can."""
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            return f"no {', '.join(missing)}"
        if list(state["candidates"]) != self.candidates or state["k"] != self.k:
            return f"made with other candidates or another k: {len(state['candidates'])} candidates, k={state['k']}"
        unknown = [name for name in state["selection"] if name not in self.units]
        if unknown:
            return f"it selects {', '.join(map(repr, unknown))}, not among the candidates"
        if state["pending"] is not None and len(state["pending"]) != len(self.candidates):
            return f"{len(state['pending'])} pending norms for {len(self.candidates)} candidates"
        return None

    def _publish(self, trainer: Any) -> None:
        trainer.state.stateful_callbacks[STATE_KEY] = self.state_dict()

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is None:
            return
        saved = state.stateful_callbacks.get(STATE_KEY) if state.global_step > 0 else None
        if saved is not None:
            self.load_state_dict(saved)
        else:
            self.reset()
        if trainer._sam_layers != self.selected_layers():
            trainer._set_sam_layers(self.selected_layers())
        self._publish(trainer)

    # -- schedule ----------------------------------------------------------------------------------------------
    def windows_per_probe(self, trainer: Any) -> int:
        return math.ceil(trainer.args.sam_probe_batches / max(trainer.args.gradient_accumulation_steps, 1))

    def is_probe_step(self, step: int, trainer: Any) -> bool:
        """Whether optimizer step `step` (0-based) contributes to a probe."""
        interval, n = trainer.args.sam_probe_interval, self.windows_per_probe(trainer)
        return step < n if interval == 0 else step % interval < n

    def after_micro_batch(self, trainer: Any) -> None:
        """Called by the trainer after every micro-batch: on the last micro-batch of a probe step's window, read the
        per-layer norms of `.grad` (all candidates hold the window's pass-2 gradient there) and, at the end of a probe,
        rank and re-select through `trainer._set_sam_layers`."""
        if not trainer.accelerator.sync_gradients:
            return  # not the last micro-batch of the window: `.grad` holds a partial sum
        step = trainer.state.global_step
        if not self.is_probe_step(step, trainer):
            return
        if self._owned is None:  # each candidate's parameters (a block: those of all its layers)
            owned = owned_parameters(trainer.model, [layer for layers in self.units.values() for layer in layers])
            self._owned = {name: [p for layer in layers for p in owned.get(layer, [])]
                           for name, layers in self.units.items()}
        if all(p.grad is None for ps in self._owned.values() for p in ps):
            logger.warning(  # e.g. an engine that keeps gradients in its own buffers: nothing to rank
                f"LW-SAM probe at step {step}: no candidate layer holds a .grad after the backward; the selection "
                "is kept. Use sam_selection='pattern' with this setup."
            )
            return
        squared = grad_squared_norms(self._owned)
        if trainer.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(squared)  # every process ranks the same vector: identical selections
            if not is_sharded([p for ps in self._owned.values() for p in ps]):
                squared /= trainer.accelerator.num_processes  # DDP: every process held the whole, all-reduced .grad
            # FSDP2: the shards' squared norms add up to the whole gradient's
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            squared /= scaler._get_scale_async() ** 2  # fp16: `.grad` is still scaled here (the scale as a tensor)
        # Summed on the device (no host sync until the probe ends); an overflowed window is left out of the probe.
        squared = squared.double()
        finite = torch.isfinite(squared).all()
        if isinstance(self.pending, list):  # restored from a checkpoint
            self.pending = torch.tensor(self.pending, dtype=torch.float64, device=squared.device)
        self.pending = torch.where(finite, squared, 0.0) + (0.0 if self.pending is None else self.pending)
        self.pending_windows = finite.double() + self.pending_windows
        interval, n = trainer.args.sam_probe_interval, self.windows_per_probe(trainer)
        if (step if interval == 0 else step % interval) == n - 1:  # the probe's last window
            self._finish(trainer, step)
            self._publish(trainer)

    def _finish(self, trainer: Any, step: int) -> None:
        pending = torch.as_tensor(self.pending, dtype=torch.float64)
        windows = torch.as_tensor(self.pending_windows, dtype=torch.float64, device=pending.device).reshape(1)
        numels = torch.tensor([sum(p.numel() for p in ps) for ps in self._owned.values()], dtype=torch.float64,
                              device=pending.device)
        mean = pending / windows.clamp_min(1)  # mean of per-window ||g_l||^2
        score = scores(mean, numels, trainer.args.sam_probe_metric, self.costs)
        *values, n_windows = torch.cat([score, windows]).tolist()
        if not n_windows:  # the tolist above is the probe's one host sync
            logger.warning(f"LW-SAM probe at step {step}: every window overflowed; the selection is kept.")
            self.pending, self.pending_windows = None, 0
            return
        self.last_norms = dict(zip(self._owned, values))
        selection = rank_layers(self.last_norms, self.k)
        self.pending, self.pending_windows = None, 0
        self.num_probes += 1
        self.last_probe_step = step
        self.history.append((step, selection))
        if selection != self.selection:
            self.selection = selection
            self.changes_in_window += 1
            trainer._set_sam_layers(self.selected_layers())
            logger.info(
                f"LW-SAM probe at step {step} changed the selection (sam/selection_changed): {', '.join(selection)}"
            )

    def pop_changes(self) -> int:
        """Selection changes since the last call (for the `sam/selection_changed` log)."""
        changes, self.changes_in_window = self.changes_in_window, 0
        return changes
