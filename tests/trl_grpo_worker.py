"""One rank of `test_trl_grpo.test_the_free_preset_under_ddp_equals_momentum_sam_by_hand`: two GRPO steps on 2 CPU
processes (gloo), `GRPOLWSAMTrainer` with `sam_preset="free"` and TRL's GRPOTrainer with Momentum-SAM written out
(`MomentumSAMByHand`); saves `<out>/rank<r>.pt`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import trl

from hf_lwsam.trl import GRPOLWSAMConfig, GRPOLWSAMTrainer
from test_trl_grpo import ADAMW, MomentumSAMByHand, grpo, logged, weights


def main(out: str) -> None:
    expected = grpo(MomentumSAMByHand, trl.GRPOConfig, Path(out), **ADAMW)
    trainer = grpo(GRPOLWSAMTrainer, GRPOLWSAMConfig, Path(out), **ADAMW, sam_preset="free",
                   sam_rho=MomentumSAMByHand.rho)
    torch.save({"expected": weights(expected.model), "ours": weights(trainer.model),
                "world_size": trainer.accelerator.num_processes, "sam_steps": logged(trainer, "sam/sam_steps"),
                "rewards": (logged(trainer, "reward"), logged(expected, "reward"))},
               f"{out}/rank{trainer.accelerator.process_index}.pt")
    if torch.distributed.is_initialized():  # no gloo thread left to abort at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
