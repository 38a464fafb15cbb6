"""Activation reuse: pass 2 skips the trunk blocks below the lowest perturbed block.

The weights below the cut do not change between the two passes, so neither do those blocks' outputs. Pass 1 keeps the
outputs of `blocks[:cut]` (with their autograd graph); in pass 2 each of those blocks returns its kept output instead
of recomputing it, so only the upper blocks, the final norm and the head run again, and one backward goes through
everything. The gradients equal the plain two-pass ones; the cost drops from 2F + 2B to F + B + (F + B of the top).

A replayed call must be indistinguishable from recomputing it, so record and replay match calls one to one:

- every call of a kept block is kept, in order (a loss may run the model several times: a no-grad target forward, a
  reference forward with PEFT adapters disabled); pass 2's k-th call of a block gets pass 1's k-th call, and only if
  its inputs (tensors, and the state inside tuples, dicts and `Cache` objects), grad mode, autocast and module state
  (train/eval, PEFT adapters enabled/merged) are the same;
- forward hooks and pre-hooks on the blocks' submodules (transformers' output recorders collect router logits,
  attentions and hidden states this way) are fired again on replay with the kept arguments and outputs, in the
  original order, so an aux loss or an attention-based loss sees every layer;
- side effects on the arguments (a `Cache` filled by the layer, Gemma3n's shared-KV dict) are applied again to pass
  2's arguments; a side effect that cannot be replayed (an input tensor modified in place, items removed) turns reuse
  off;
- dropout: the trainer restores the RNG state before pass 2, and a replayed pass restores, after the last kept block,
  the RNG state pass 1 had there, so the upper blocks draw the same masks as without reuse.

Anything else that differs sets `mismatch`: that pass recomputes from the mismatching call on (with pass 1's RNG state
for it, so the fallback is exact too) and the trainer switches reuse off with the reason logged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.modules.module as torch_module
from torch import nn

from .selection import find_trunk, input_embedding

_MAX_DEPTH = 12  # how far into nested arguments (Cache -> layers -> layer attributes) state is compared and diffed
_PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_MISSING = object()


def capture_rng() -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU and current-CUDA-device generator states (no device synchronisation)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------------------------------ argument state
def _is_plain_object(value: Any) -> bool:
    """An object whose attributes are data (a `Cache`, a cache layer, a `UserDict`), not code or a module."""
    return hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)) and not callable(value)


def _flatten(value: Any, out: list, depth: int = 0) -> list:
    """The leaves of `value`: tensors with their version counters, primitives, and markers for the structure of
    tuples, lists, dicts and plain objects (recursively); anything else by identity."""
    if isinstance(value, torch.Tensor):
        out.append((value, value._version))
    elif isinstance(value, _PRIMITIVES):
        out.append(value)
    elif depth >= _MAX_DEPTH:
        out.append(("id", id(value)))
    elif isinstance(value, (tuple, list)):
        out.append((type(value), len(value)))
        for item in value:
            _flatten(item, out, depth + 1)
    elif isinstance(value, dict):
        out.append((type(value), tuple(value)))
        for item in value.values():
            _flatten(item, out, depth + 1)
    elif _is_plain_object(value):
        out.append(type(value))
        _flatten(vars(value), out, depth + 1)
    else:
        out.append(("id", id(value)))
    return out


def _same_inputs(now: list, then: list) -> bool:
    if len(now) != len(then):
        return False
    for a, b in zip(now, then):
        if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], torch.Tensor):
            if not (isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], torch.Tensor)):
                return False
            (x, _), (y, version) = a, b
            if y._version != version:  # pass 1's input was modified in place since: its recorded value is gone
                return False
            # `is` first: a kept block's input is usually the previous kept block's output object.
            same = x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
            if not (x is y or (same and torch.equal(x, y))):
                return False
        elif type(a) is not type(b) or a != b:
            return False
    return True


def _containers(value: Any, path: tuple, out: dict, depth: int = 0) -> dict:
    """`{id: (path, container)}` for every mutable container reachable from `value` (dicts, lists, plain objects)."""
    if isinstance(value, (torch.Tensor, *_PRIMITIVES)) or depth >= _MAX_DEPTH:
        return out
    if isinstance(value, (dict, list)) or _is_plain_object(value):
        if id(value) in out:
            return out
        out[id(value)] = (path, value)
    if isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _containers(item, (*path, ("item", i)), out, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _containers(item, (*path, ("item", key)), out, depth + 1)
    elif _is_plain_object(value):
        for key, item in vars(value).items():
            _containers(item, (*path, ("attr", key)), out, depth + 1)
    return out


def _contents(container: Any) -> dict | list:
    """A shallow copy of what a container holds: list items, dict items, or an object's attributes."""
    if isinstance(container, list):
        return list(container)
    return dict(container) if isinstance(container, dict) else dict(vars(container))


@dataclass
class _Effect:
    """One change a block made to a container among its arguments: `key` set to `value`, or list `items` appended."""

    path: tuple
    key: Any = None
    value: Any = None
    items: list | None = None

    def apply(self, root: Any) -> None:
        container = root
        for kind, step in self.path:
            container = getattr(container, step) if kind == "attr" else container[step]
        if self.items is not None:
            container.extend(self.items)
        elif isinstance(container, dict):
            container[self.key] = self.value
        else:
            setattr(container, self.key, self.value)


def _side_effects(snapshot: dict, tensors: list) -> list[_Effect] | str:
    """The changes made to the containers of `snapshot` (`{id: (path, container, contents before)}`) since it was
    taken, or why they cannot be replayed."""
    if any(t._version != version for t, version in tensors):
        return "modifies an input tensor in place"
    effects = []
    for path, container, before in snapshot.values():
        now = _contents(container)
        if isinstance(before, list):
            if len(now) < len(before) or any(a is not b for a, b in zip(now, before)):
                return "changes a list among its inputs other than by appending"
            if len(now) > len(before):
                effects.append(_Effect(path, items=now[len(before):]))
            continue
        if any(key not in now for key in before):
            return "removes an entry of a dict or object among its inputs"
        effects += [_Effect(path, key, value) for key, value in now.items()
                    if key not in before or before[key] is not value]
    return effects


def _module_state(modules: list[nn.Module]) -> tuple:
    """What besides the inputs decides a block's output: grad mode, autocast, train/eval, PEFT adapter switches."""
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    peft = tuple((getattr(m, "_disable_adapters", None), tuple(getattr(m, "active_adapters", ()) or ()),
                  getattr(m, "merged", None)) for m in modules if hasattr(m, "_disable_adapters"))
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, peft,
            tuple(m.training for m in modules))


# ------------------------------------------------------------------------------------------------- hooks
def _global_hooks() -> bool:
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class _HookRecorder:
    """Records, during one real block call, every call of a submodule that has forward hooks or pre-hooks, so that
    a replay can fire those hooks again with the same arguments and outputs."""

    def __init__(self, modules: list[nn.Module]):
        self.events: list[tuple] = []
        self._handles = []
        for m in modules:
            if m._forward_hooks or m._forward_pre_hooks:
                self._handles.append(m.register_forward_pre_hook(self._pre, prepend=True, with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._post, prepend=True, with_kwargs=True))

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.events.append(("pre", module, args, dict(kwargs), None))

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.events.append(("post", module, args, dict(kwargs), output))

    def remove(self) -> list[tuple]:
        for handle in self._handles:
            handle.remove()
        return self.events


def _fire_hooks(events: list[tuple]) -> None:
    """Run the hooks registered on each recorded submodule call, as `nn.Module.__call__` would have."""
    for kind, module, args, kwargs, output in events:
        if kind == "pre":
            for hook_id, hook in list(module._forward_pre_hooks.items()):
                if module._forward_pre_hooks_with_kwargs.get(hook_id, False):
                    result = hook(module, args, kwargs)
                    if result is not None:
                        args, kwargs = result
                else:
                    result = hook(module, args)
                    if result is not None:
                        args = result if isinstance(result, tuple) else (result,)
        else:
            for hook_id, hook in list(module._forward_hooks.items()):
                with_kwargs = module._forward_hooks_with_kwargs.get(hook_id, False)
                result = hook(module, args, kwargs, output) if with_kwargs else hook(module, args, output)
                if result is not None:
                    output = result


# ---------------------------------------------------------------------------------------------- the replay
@dataclass
class _Call:
    """One recorded call of a kept block."""

    inputs: list
    state: tuple
    rng: tuple[torch.Tensor, torch.Tensor | None]  # before the call: a fallback recomputes with pass 1's draws
    output: Any = None
    hooks: list = field(default_factory=list)
    effects: list = field(default_factory=list)
    rng_after: tuple[torch.Tensor, torch.Tensor | None] | None = None  # after the last kept block only


class ActivationReuse:
    """Keeps and replays the calls of `blocks[:cut]` for one micro-batch.

    Args:
        blocks (`nn.ModuleList`): the model's repeated-block trunk.
        cut (`int`): index of the lowest perturbed block; `blocks[:cut]` are replayed.
    """

    def __init__(self, blocks: nn.ModuleList, cut: int):
        self.blocks, self.cut = blocks, cut
        self.mismatch: str | None = None  # why this micro-batch could not replay; reuse must then be switched off
        self._mode = "off"
        self._calls: list[list[_Call]] = [[] for _ in range(cut)]
        self._submodules = [[m for m in blocks[i].modules() if m is not blocks[i]] for i in range(cut)]

    def _stop(self, reason: str) -> None:
        self.mismatch = self.mismatch or reason
        self._mode, self._calls = "off", [[] for _ in range(self.cut)]

    def _record(self, index: int, forward: Any, args: tuple, kwargs: dict) -> Any:
        if _global_hooks():
            self._stop("global module forward hooks are registered (torch.nn.modules.module), which a replay skips")
            return forward(*args, **kwargs)
        modules = [self.blocks[index], *self._submodules[index]]
        call = _Call(inputs=_flatten((args, kwargs), []), state=_module_state(modules), rng=capture_rng())
        snapshot = {key: (path, c, _contents(c)) for key, (path, c) in _containers((args, kwargs), (), {}).items()}
        tensors = [leaf for leaf in call.inputs if isinstance(leaf, tuple) and isinstance(leaf[0], torch.Tensor)]
        recorder = _HookRecorder(self._submodules[index])
        try:
            call.output = forward(*args, **kwargs)
        finally:
            call.hooks = recorder.remove()
        effects = _side_effects(snapshot, tensors)
        if isinstance(effects, str):
            self._stop(f"block {index} of the trunk {effects}, which a replay cannot repeat")
            return call.output
        call.effects = effects
        if index == self.cut - 1:
            call.rng_after = capture_rng()
        self._calls[index].append(call)
        return call.output

    def _replay(self, index: int, forward: Any, args: tuple, kwargs: dict) -> Any:
        calls = self._calls[index]
        if not calls:  # more calls than pass 1 made (e.g. a checkpoint recomputation in backward): compute
            return forward(*args, **kwargs)
        call = calls.pop(0)
        modules = [self.blocks[index], *self._submodules[index]]
        if _module_state(modules) != call.state:
            reason = "grad mode, autocast or module state (train/eval, PEFT adapters)"
        elif not _same_inputs(_flatten((args, kwargs), []), call.inputs):
            reason = "inputs"
        else:
            for effect in call.effects:
                effect.apply((args, kwargs))
            _fire_hooks(call.hooks)
            if call.rng_after is not None:
                restore_rng(call.rng_after)  # the upper blocks draw pass 1's dropout masks
            return call.output
        self._stop(f"block {index} of the trunk saw different {reason} in the perturbed pass than in pass 1")
        restore_rng(call.rng)  # the recomputation draws what pass 1 drew here, as without reuse
        return forward(*args, **kwargs)

    def _wrap(self, index: int, block: nn.Module) -> None:
        forward = block.forward  # an instance-level forward (accelerate hooks) is wrapped, not replaced

        def reusing_forward(*args: Any, **kwargs: Any) -> Any:
            if self._mode == "record":
                return self._record(index, forward, args, kwargs)
            if self._mode == "replay":
                return self._replay(index, forward, args, kwargs)
            return forward(*args, **kwargs)

        block.forward = reusing_forward  # instance attribute: nn.Module.__call__ dispatches to it

    @contextmanager
    def session(self) -> Iterator[ActivationReuse]:
        """Install the wrappers for one micro-batch; `record()` / `replay()` switch modes inside."""
        saved = [self.blocks[i].__dict__.get("forward", _MISSING) for i in range(self.cut)]
        for i in range(self.cut):
            self._wrap(i, self.blocks[i])
        try:
            yield self
        finally:
            for i, forward in enumerate(saved):
                if forward is _MISSING:
                    del self.blocks[i].__dict__["forward"]
                else:
                    self.blocks[i].forward = forward  # e.g. accelerate's hook, exactly as it was
            self._mode, self._calls = "off", [[] for _ in range(self.cut)]

    def record(self) -> None:
        self._mode = "record"

    def replay(self) -> None:
        """Switch to replay; a no-op (plain recomputation) if pass 1 kept nothing or could not be recorded."""
        complete = self.mismatch is None and all(self._calls)
        self._mode = "replay" if complete else "off"


def is_compiled(model: nn.Module) -> bool:
    """Whether `model` runs under `torch.compile`: an `OptimizedModule` wrapper (`torch_compile=True`), or a module of
    it compiled in place (`nn.Module.compile`)."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def plan_reuse(model: nn.Module, perturbed: list[nn.Parameter]) -> tuple[nn.ModuleList, int] | str:
    """`(blocks, cut)` when pass 2 may replay `blocks[:cut]`, else the reason it may not."""
    trunk = find_trunk(model)
    if trunk is None:
        return "no repeated-block trunk (nn.ModuleList of transformer blocks) was found"
    _, blocks = trunk
    perturbed_ids = {id(p) for p in perturbed}
    cut = len(blocks)
    for i, block in enumerate(blocks):
        if any(id(p) in perturbed_ids for p in block.parameters()):
            cut = i
            break
    if cut == 0:
        return "the lowest trunk block is perturbed, so nothing below it can be reused"
    below = {id(p) for block in blocks[:cut] for p in block.parameters()}
    embedding = input_embedding(model)
    if embedding is not None:
        below |= {id(p) for p in embedding.parameters()}
    if below & perturbed_ids:
        return (
            "a perturbed parameter is also used below the cut (an output head tied to the input embedding, or "
            "shared weights)"
        )
    return blocks, cut
