"""One rank of the multi-process tests (not collected by pytest): trains `LWSAMTrainer` under the launcher's process
group and saves what each rank saw and did for `tests/test_distributed.py` to compare.

Launch (the parent test does this):

    accelerate launch --config_file scripts/accelerate_configs/cpu_2proc.yaml tests/distributed_worker.py \
        --out DIR --scenarios sync_ga1 local_ga1

Each scenario writes `DIR/<scenario>_rank<r>.pt`: a dict with
- `start`, `end`: the trainable parameters before and after training (the model given to the trainer);
- `passes`: one entry per `compute_loss` call, in order; pass 1 (ascent) and pass 2 (perturbed) alternate. Each holds
  the micro-batch's `input_ids`, whether DDP would all-reduce in the following backward (`require_backward_grad_sync`)
  and how many DDP buckets were all-reduced since the previous call; pass 2 also holds `perturbation`, the applied e_S
  (parameters at w + e minus parameters at w) and `perturbed_names`;
- `log_history`, `selected` (the perturbed parameter names), `world_size`, `rank`, `mixed_precision`,
  `reuse_disabled_reason` (`None` when pass 2 reused pass 1's lower-block activations), `probe_history` and `kept`
  (LookSAM's g_v at the end).
Scenarios in `SINGLE_PASS` (LookSAM, random and momentum perturbation) record `at` (the selected parameters at the
call) instead of pass 1/pass 2 pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import shakespeare_lm_dataset, tiny_gpt2  # noqa: E402
from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402

RHO = 0.5  # large, so that SAM's update is far from plain SGD's
TARGET = ["h.2", "ln_f"]  # layer-wise: the last block and the final norm of tiny_gpt2(n_layer=3)

# name -> (LWSAMConfig overrides, number of examples). The one-step SGD(lr=1) scenarios are checked against math;
# the multi-step ones for rank agreement.
ONE_STEP_SGD = dict(max_steps=1, learning_rate=1.0, optim="sgd", sam_rho=RHO, sam_target_layers=TARGET)
SCHEDULE_SGD = dict(gradient_accumulation_steps=2, learning_rate=0.2, optim="sgd", sam_rho=RHO)
SINGLE_PASS = ("looksam_sync", "looksam_local", "random_late", "momentum", "momentum_own")  # may take one pass
SCENARIOS: dict[str, tuple[dict[str, Any], int]] = {
    "sync_ga1": (dict(ONE_STEP_SGD, gradient_accumulation_steps=1, sam_sync_perturbation=True), 4),
    "local_ga1": (dict(ONE_STEP_SGD, gradient_accumulation_steps=1), 4),
    "sync_ga2": (dict(ONE_STEP_SGD, gradient_accumulation_steps=2, sam_sync_perturbation=True), 8),
    "local_ga2": (dict(ONE_STEP_SGD, gradient_accumulation_steps=2), 8),
    # Pass 2 recomputes the whole model (the others replay pass 1's lower blocks when the trainer can).
    "sync_ga2_noreuse": (dict(ONE_STEP_SGD, gradient_accumulation_steps=2, sam_sync_perturbation=True,
                              sam_reuse_activations=False), 8),
    "multistep": (dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=3e-3, optim="adamw_torch",
                       sam_rho=0.05, sam_selection="all", max_grad_norm=1.0), 32),
    # LookSAM (k=2) and random perturbation from step 1: one pass on some steps, so these record `at` (the selected
    # parameters at every compute_loss call) instead of pass 1/pass 2 pairs.
    "looksam_sync": (dict(SCHEDULE_SGD, max_steps=4, sam_target_layers=TARGET, sam_sync_perturbation=True,
                          sam_interval=2, sam_interval_reuse="looksam"), 32),
    "looksam_local": (dict(SCHEDULE_SGD, max_steps=4, sam_target_layers=TARGET, sam_interval=2,
                           sam_interval_reuse="looksam"), 32),
    "random_late": (dict(SCHEDULE_SGD, max_steps=3, sam_selection="all", sam_ascent="random", sam_start=1), 24),
    # Momentum-SAM with AdamW: e_S from the optimizer's first moment, which DDP keeps identical on every process.
    "momentum": (dict(max_steps=4, gradient_accumulation_steps=2, learning_rate=1e-2, optim="adamw_torch",
                      sam_rho=0.3, sam_ascent="momentum", sam_target_layers=TARGET), 32),
    # ... with its own average of the all-reduced gradients, under plain SGD (which keeps no moment).
    "momentum_own": (dict(SCHEDULE_SGD, max_steps=4, sam_ascent="momentum", sam_momentum="own",
                          sam_target_layers=TARGET), 32),
    "probe": (dict(max_steps=3, gradient_accumulation_steps=1, learning_rate=3e-3, optim="adamw_torch",
                   sam_rho=0.05, sam_selection="probe", sam_top_k=2, sam_probe_interval=1, sam_probe_batches=1), 12),
}


class RecordingTrainer(LWSAMTrainer):
    """`LWSAMTrainer` that records, at every `compute_loss` call, the batch and the parameters it is called at.

    Observation only: the training math is the parent class's.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.passes: list[dict[str, Any]] = []
        self.bucket_allreduces = 0
        self._hooked = False
        self._at_w: dict[str, torch.Tensor] = {}

    def _count_allreduce(self, state, bucket):  # no annotations: DDP rejects the string ones of `__future__`
        """DDP communication hook: count one bucket all-reduce, then do it as DDP does by default."""
        self.bucket_allreduces += 1
        return default_hooks.allreduce_hook(None, bucket)  # what DDP does by default: mean over the group

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not self._hooked:
            model.register_comm_hook(None, self._count_allreduce)  # before the first backward
            self._hooked = True
        named = dict(self._sam_parameters())
        record: dict[str, Any] = {
            "input_ids": inputs["input_ids"].detach().cpu().clone(),
            "will_sync": bool(getattr(model, "require_backward_grad_sync", False)),
            "allreduces_before": self.bucket_allreduces,
        }
        if self.args.sam_ascent in ("random", "momentum") or self.args.sam_interval_reuse == "looksam":
            record["at"] = {n: p.detach().float().cpu().clone() for n, p in named.items()}
        elif len(self.passes) % 2 == 0:  # pass 1, at w
            self._at_w = {n: p.detach().float().cpu().clone() for n, p in named.items()}
        else:  # pass 2, at w + e
            record["perturbation"] = {n: p.detach().float().cpu() - self._at_w[n] for n, p in named.items()}
            record["perturbed_names"] = list(named)
        self.passes.append(record)
        return super().compute_loss(model, inputs, **kwargs)


def make_args(name: str, output_dir: str, **changes: Any) -> tuple[LWSAMConfig, int]:
    """The `LWSAMConfig` of scenario `name` (plus `changes`) and its number of examples."""
    overrides, n_examples = SCENARIOS[name]
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=2, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, warmup_steps=0, train_sampling_strategy="sequential", report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    kwargs.update(overrides)
    kwargs.update(changes)
    return LWSAMConfig(**kwargs), n_examples


def run(name: str, out: str) -> None:
    """Train scenario `name` on this rank and save `out/<name>_rank<r>.pt`."""
    args, n_examples = make_args(name, os.path.join(out, f"trainer_{name}"))
    model = tiny_gpt2()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = RecordingTrainer(model=model, args=args, train_dataset=shakespeare_lm_dataset(n_examples))
    trainer.train()
    rank = trainer.accelerator.process_index
    result = {
        "start": start,
        "end": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "passes": trainer.passes,
        "allreduces_total": trainer.bucket_allreduces,
        "log_history": trainer.state.log_history,
        "selected": trainer.perturbed_parameter_names(),
        "world_size": trainer.accelerator.num_processes,
        "rank": rank,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "reuse_disabled_reason": getattr(trainer, "reuse_disabled_reason", None),
        # sam_selection="probe": (step, selection) of every completed probe on this rank.
        "probe_history": getattr(getattr(trainer, "_layer_probe", None), "history", None),
        # sam_interval_reuse="looksam": the kept component g_v at the end (the last SAM step's).
        "kept": trainer._schedule.direction(trainer.perturbed_parameter_names()),
    }
    torch.save(result, os.path.join(out, f"{name}_rank{rank}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the per-rank result files")
    parser.add_argument("--scenarios", nargs="+", required=True, choices=list(SCENARIOS))
    cli = parser.parse_args()
    for name in cli.scenarios:
        run(name, cli.out)
    # Leave no gloo thread to be torn down at interpreter exit: without this a rank can abort
    # ("terminate called without an active exception", SIGABRT) after its results are written.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
