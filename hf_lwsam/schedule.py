"""Ascent schedules: which optimizer steps are SAM steps (`sam_start`, `sam_interval`), what the steps between do
(`sam_interval_reuse`), and the vector an ascent keeps between steps.

When: optimizer step `s` is a SAM step when `s >= start` and `(s - start) % interval == 0`; `start` is `sam_start`, a
step or a fraction of the run's `max_steps` (the first step `s >= fraction * max_steps`). The interval counts from the
start, so the first step of the late phase is a SAM step. Every other step is a plain step: exactly the stock step,
or, with `sam_interval_reuse="looksam"`, a LookSAM step (after the late phase started): the stock step plus the kept
component (`sam.looksam_add_`) once per optimizer step, on the window's last micro-batch.

Where e_S comes from is each ascent's own (`hf_lwsam.ascent`, one class per `sam_ascent`); this module keeps the vector
an ascent carries between steps when its `kept_vector` names one: the stale ascent's gradient of S, LookSAM's g_v, the
momentum ascent's own average m (`average`, one float32 copy of S updated at each optimizer step).

The first stale SAM step of a run (or of the late phase), and the first one after the selection changed (a probe), has
no stale gradient of S: it is a plain step, whose gradient is recorded for the next SAM step. The kept vector (the
stale gradient of S, LookSAM's g_v, or the momentum ascent's own m) is saved with every checkpoint
(`lwsam_ascent.pt`) so that a resumed run perturbs and reuses exactly as an uninterrupted one. Under FSDP2 each
process keeps only its shard of the vector, so each process saves its own (`lwsam_ascent_rank{N}.pt`) with the layout
of its tensors (device mesh and placements); a resume checks the names, shapes, the number of processes and the
layout, and refuses a mismatch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from .ascent import ASCENTS
from .sharding import layout

if TYPE_CHECKING:
    from .ascent import Ascent

logger = logging.get_logger(__name__)

STATE_FILE = "lwsam_ascent.pt"
RANK_STATE_FILE = "lwsam_ascent_rank{}.pt"  # one per process: the kept vector is sharded (FSDP2)


class AscentSchedule:
    """The SAM-step policy and the kept vector of S (the stale gradient, LookSAM's g_v, or Momentum-SAM's own m).

    Args:
        interval (`int`): SAM steps are every `interval`-th optimizer step from `start` on.
        ascent (`str` or `Ascent`): the ascent (a key of `hf_lwsam.ascent.ASCENTS`, or the trainer's instance of it);
            its `kept_vector` says which vector a checkpoint carries.
        start (`int` or `float`, *optional*, defaults to `0`): an optimizer step, or a fraction in `[0, 1)` of the
            run's `max_steps`.
        reuse (`str`, *optional*, defaults to `"none"`): `"none"` or `"looksam"` (what the steps between do).
    """

    def __init__(self, interval: int = 1, ascent: str | Ascent = "exact", start: int | float = 0,
                 reuse: str = "none"):
        self.interval, self.ascent, self.start, self.reuse = interval, ascent, start, reuse
        self._names: list[str] = []
        self._grads: list[torch.Tensor] | None = None
        self._per_process = False  # the kept vector is this process's shard of it (FSDP2)
        self._source = ""  # the checkpoint file it was loaded from, for error messages
        self._clean: list[torch.Tensor] | None = None  # LookSAM: the SAM window's clean gradient of S, summed

    def start_step(self, max_steps: int | None = None) -> int:
        """The first step of the SAM phase: `start` itself, or for a fraction the first step `s >= start * max_steps`
        (rounded to 9 digits first, so 0.7 * 10 is step 7, not 8)."""
        if isinstance(self.start, int):
            return self.start
        return math.ceil(round(self.start * max(int(max_steps or 0), 0), 9))

    def is_sam_step(self, step: int, max_steps: int | None = None) -> bool:
        start = self.start_step(max_steps)
        return step >= start and (step - start) % self.interval == 0

    def is_looksam_step(self, step: int, max_steps: int | None = None) -> bool:
        """A step between two SAM steps of the late phase on which LookSAM adds its kept component."""
        return self.looksam and step > self.start_step(max_steps) and not self.is_sam_step(step, max_steps)

    @property
    def looksam(self) -> bool:
        return self.reuse == "looksam"

    @property
    def kind(self) -> str | None:
        """The kind of the kept vector (written with it, and compared on a resume): `"looksam"` (g_v) under LookSAM,
        else the ascent's `kept_vector` (`"stale"`, `"momentum"` for the own m), `None` when nothing is kept."""
        if self.looksam:
            return "looksam"
        ascent = ASCENTS[self.ascent] if isinstance(self.ascent, str) else self.ascent
        return ascent.kept_vector

    @property
    def keeps_state(self) -> bool:
        """Whether a checkpoint must carry the kept vector for an exact resume."""
        return self.kind is not None

    @property
    def per_process(self) -> bool:
        """Whether the kept vector differs between processes (FSDP2 shards), so each process saves its own."""
        return self._per_process

    def direction(self, names: list[str], like: list[torch.Tensor] | None = None) -> list[torch.Tensor] | None:
        """The kept vector of S for the parameters `names`, or `None` when there is none for this selection.

        Raises:
            ValueError: a vector restored from a checkpoint whose shapes differ from `like` (this process's tensors
                of S): the checkpoint was written with another sharding.
        """
        if self._grads is None or names != self._names:
            return None
        if like is not None and [tuple(g.shape) for g in self._grads] != [tuple(t.shape) for t in like]:
            bad = next(n for n, g, t in zip(names, self._grads, like) if g.shape != t.shape)
            raise ValueError(f"The kept ascent vector in {self._source or 'the checkpoint'} does not fit this run: "
                             f"{bad} has shape {tuple(self._grads[names.index(bad)].shape)} there but "
                             f"{tuple(like[names.index(bad)].shape)} here. Resume with the same number of processes "
                             "and the same sharding as the run that wrote the checkpoint.")
        return self._grads

    @torch.no_grad()
    def keep(self, names: list[str], grads: list[torch.Tensor | None], like: list[torch.Tensor],
             per_process: bool = False) -> None:
        """Copy the vector of S (stale: `.grad` after the window's last backward, before the optimizer step; LookSAM:
        g_v; a missing one as zeros shaped like `like`). `per_process`: it is this process's shard (FSDP2)."""
        self._names = list(names)
        self._grads = [torch.zeros_like(t) if g is None else g.detach().clone() for g, t in zip(grads, like)]
        self._per_process, self._source = per_process, ""

    @torch.no_grad()
    def average(self, names: list[str], grads: list[torch.Tensor | None], like: list[torch.Tensor], beta: float,
                per_process: bool = False) -> None:
        """The momentum ascent's own average, kept as the vector of S: m <- beta m + (1 - beta) g in float32, from
        m = 0 (as Adam's `exp_avg`; started over for another selection `names`). A parameter without a gradient keeps
        its m (as Adam skips it); a non-finite g (any entry) keeps the whole m, decided on the device.
        `per_process`: m is this process's shard (FSDP2)."""
        if self._grads is None or names != self._names:
            self._names, self._grads = list(names), [torch.zeros_like(t, dtype=torch.float32) for t in like]
            self._per_process, self._source = per_process, ""
        self.direction(names, like=like)  # a restored m of another sharding: refused, as on a SAM step
        pairs = [(m, g.float()) for m, g in zip(self._grads, grads) if g is not None]
        if not pairs:
            return
        moments, new = [m for m, _ in pairs], [g for _, g in pairs]
        finite = torch.stack([torch.isfinite(g).all() for g in new]).all()
        new = [torch.where(finite, g, m) for m, g in pairs]  # lerp(m, m, w) = m: a non-finite step changes nothing
        torch._foreach_lerp_(moments, new, 1 - beta)  # m + (1 - beta) (g - m): Adam's exp_avg.lerp_(grad, 1 - beta1)

    # -- LookSAM: the SAM window's clean gradient of S -----------------------------------------------------------
    @torch.no_grad()
    def add_clean(self, grads: list[torch.Tensor]) -> None:
        """Add one micro-batch's ascent-pass gradient of S (the clean gradient, as pass 1 computed it) to the window's
        sum (copied: the ascent step reuses the storage of `grads`)."""
        if self._clean is None:
            self._clean = [g.detach().clone() for g in grads]
        else:
            torch._foreach_add_(self._clean, grads)

    def pop_clean(self) -> list[torch.Tensor]:
        """The window's clean gradient of S; the sum starts over."""
        clean, self._clean = self._clean, None
        return clean

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self, checkpoint_dir: str, process_index: int = 0, num_processes: int = 1,
             params: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the kept vector: one file for the run, or with `per_process` one per process, with the layout of the
        model's parameters `params` (by name) it was kept for (`sharding.layout`). Without one yet, the run's file
        says so (`grads` None), so a checkpoint missing its file is told apart from one saved before any."""
        if self._grads is None:
            if process_index == 0:
                torch.save({"names": [], "grads": None, "kind": self.kind, "per_process": False,
                            "num_processes": num_processes, "process_index": 0, "layout": None},
                           os.path.join(checkpoint_dir, STATE_FILE))
            return
        name = RANK_STATE_FILE.format(process_index) if self._per_process else STATE_FILE
        torch.save({"names": self._names, "grads": [g.cpu() for g in self._grads], "kind": self.kind,
                    "per_process": self._per_process, "num_processes": num_processes,
                    "process_index": process_index, "layout": _layout_of(self._names, params)},
                   os.path.join(checkpoint_dir, name))

    def load(self, checkpoint_dir: str, device: Any, process_index: int = 0, num_processes: int = 1,
             params: Mapping[str, torch.Tensor] | None = None) -> None:
        """Read the kept vector this process saved (or the run's one); `params`: the model's parameters by name, whose
        layout a per-process vector must have been saved with.

        Raises:
            ValueError: the checkpoint holds per-process vectors written by another number of processes, or with
                another layout of the parameters (device mesh, placements).
        """
        path = os.path.join(checkpoint_dir, RANK_STATE_FILE.format(process_index))
        if not os.path.isfile(path):
            path = os.path.join(checkpoint_dir, STATE_FILE)
            ranked = [f for f in os.listdir(checkpoint_dir) if f.startswith("lwsam_ascent_rank")]
            if ranked and not os.path.isfile(path):
                raise ValueError(f"{checkpoint_dir} holds per-process ascent vectors ({', '.join(sorted(ranked))}) "
                                 f"but none for process {process_index}: resume with the number of processes that "
                                 "wrote the checkpoint.")
        # Read onto the CPU, then moved: torch.load cannot map onto an indexed CPU device ("cpu:0", as a model sharded
        # by transformers at load time on the CPU makes the Trainer's device).
        state = torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None
        if state is None:  # every save writes it (also without a vector): removed, or saved by an older version
            logger.warning(f"{checkpoint_dir} has no {STATE_FILE}: the run's kept vector ({self.kind}) is not "
                           "restored, so the resumed run's next steps differ from an uninterrupted one's until it is "
                           "kept again. Resume from a complete checkpoint to continue the run exactly.")
        if state is not None and state.get("per_process") and state.get("num_processes") != num_processes:
            raise ValueError(f"{path} was written by {state.get('num_processes')} processes, each keeping its shard of "
                             f"the ascent vector; this run has {num_processes}. Resume with "
                             f"{state.get('num_processes')} processes.")
        if (state is not None and state.get("per_process")
                and state.get("process_index", process_index) != process_index):
            raise ValueError(f"{path} holds the ascent vector of process {state.get('process_index')}, not of process "
                             f"{process_index}: each process must read the file it wrote.")
        if state is not None and state.get("per_process") and state.get("layout") is not None and params is not None:
            here = _layout_of(state["names"], params)
            for name, saved, now in zip(state["names"], state["layout"], here):
                if name in params and saved != now:
                    raise ValueError(f"{path} holds this process's shard of the ascent vector for another layout of "
                                     f"the parameters: {name} was laid out as {_describe(saved)} there, but is "
                                     f"{_describe(now)} here. Resume with the device mesh and sharding of the run "
                                     "that wrote the checkpoint (the same FSDP sizes, e.g. fsdp_config or "
                                     "DistributedConfig(fsdp_size=..., dp_replicate_size=...)).")
        # A checkpoint of a run without a kept vector, or with another kind of one (stale gradient vs g_v): the next
        # SAM step starts over (a plain stale step; LookSAM reuses nothing until the next SAM step).
        if state is not None and state.get("grads") is not None and state.get("kind", "stale") == self.kind:
            self._names, self._grads = state["names"], [g.to(device) for g in state["grads"]]
            self._per_process, self._source = bool(state.get("per_process", False)), path
        else:
            self._names, self._grads, self._per_process = [], None, False


def _layout_of(names: list[str], params: Mapping[str, torch.Tensor] | None) -> list[list[str] | None] | None:
    """`sharding.layout` of the parameters `names` (a name `params` lacks: `None`); `None` without `params`."""
    return None if params is None else layout([params.get(name) for name in names])


def _describe(entry: list[str] | None) -> str:
    """A `sharding.layout` entry in words."""
    if entry is None:
        return "a whole (unsharded) tensor"
    mesh, dim_names, placements = entry
    return f"placements {placements} on the device mesh of ranks {mesh} (dimensions {dim_names})"
