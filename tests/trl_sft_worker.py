"""One rank of `test_trl.test_sft_under_accelerate_launch_two_processes_are_bit_identical`: two SFT steps with
`SFTLWSAMTrainer` on 2 CPU processes (gloo); saves `<out>/rank<r>.pt`."""

from __future__ import annotations

import sys

import torch

from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer
from test_trl import COMMON, sft_data, tiny_lm, tiny_tokenizer, weights


def main(out: str) -> None:
    model = tiny_lm()
    start = weights(model)
    args = SFTLWSAMConfig(output_dir=f"{out}/sft", **{**COMMON, "max_steps": 2, "learning_rate": 1e-2}, sam_rho=0.5)
    trainer = SFTLWSAMTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tiny_tokenizer())
    trainer.train()
    torch.save({"start": start, "end": weights(model), "world_size": trainer.accelerator.num_processes,
                "reuse_disabled_reason": trainer.reuse_disabled_reason,
                "sharpness": [e["sam/sharpness"] for e in trainer.state.log_history if "sam/sharpness" in e]},
               f"{out}/rank{trainer.accelerator.process_index}.pt")
    if torch.distributed.is_initialized():  # no gloo thread left to abort at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
