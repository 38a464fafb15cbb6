"""One rank of `tests/test_ddp_loss.py` (not collected by pytest): trains a tiny sequence classifier and a tiny causal
LM under the launcher's process group, through `LWSAMTrainer` and through `hf-lwsam-train`, and saves each run's train
loss, eval loss and final weights as `OUT/<run>_rank<r>.pt`.

    accelerate launch --config_file scripts/accelerate_configs/cpu_2proc.yaml tests/ddp_loss_worker.py --out DIR \
        --cli_assets ASSETS_DIR

The scenarios and their argument lists are defined here and imported by the test, which runs the same scenarios in one
process on the same global batches (per-device batch sizes times the number of processes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import shakespeare_lm_dataset, tiny_bert, tiny_gpt2, tweet_bytes_dataset  # noqa: E402
from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402

# name -> (model factory, train set, eval set). Exact SAM with the ascent averaged over the processes
# (sam_sync_perturbation): two processes take the single-process step on the global micro-batch.
TRAINER_RUNS = {
    "trainer_classifier": (tiny_bert, lambda: tweet_bytes_dataset(16), lambda: tweet_bytes_dataset(24).select(
        range(16, 24))),
    "trainer_causal_lm": (tiny_gpt2, lambda: shakespeare_lm_dataset(16), lambda: shakespeare_lm_dataset(
        8, start=20000)),
}
CLI_TASKS = ("classification", "causal_lm")


def trainer_args(output_dir: str, world_size: int) -> LWSAMConfig:
    """2 SGD steps of 2 accumulated micro-batches; per-device batch sizes so that the global batch is the same
    (4 training, 4 evaluation rows per step) for any number of processes."""
    return LWSAMConfig(
        output_dir=output_dir, per_device_train_batch_size=2 * 2 // world_size, gradient_accumulation_steps=2,
        per_device_eval_batch_size=4 // world_size, max_steps=2, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, sam_rho=0.5, sam_selection="all", sam_sync_perturbation=True)


def run_trainer(name: str, output_dir: str, world_size: int) -> dict[str, Any]:
    make, train, evaluation = TRAINER_RUNS[name]
    model = make()
    trainer = LWSAMTrainer(model=model, args=trainer_args(output_dir, world_size), train_dataset=train(),
                           eval_dataset=evaluation())
    train_loss = trainer.train().training_loss
    return {"train_loss": train_loss, "eval_loss": trainer.evaluate()["eval_loss"],
            "accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
            "end": {n: p.detach().clone() for n, p in model.named_parameters()}}


def cli_argv(task: str, assets: Path, output_dir: str, world_size: int) -> list[str]:
    """`hf-lwsam-train` flags for `task` on the assets `tests/test_ddp_loss.py` writes (the same global batch of 8
    rows, 4 per step, for any number of processes)."""
    data = (["--model_name_or_path", str(assets / "tiny-bert"), "--train_file", str(assets / "tweets" / "train.csv"),
             "--validation_file", str(assets / "tweets" / "validation.csv"), "--label_column", "sentiment"]
            if task == "classification" else
            ["--model_name_or_path", str(assets / "tiny-gpt2"), "--task", "causal_lm", "--train_file",
             str(assets / "plays" / "train.txt"), "--validation_file", str(assets / "plays" / "validation.txt")])
    return [*data, "--output_dir", output_dir, "--max_length", "32", "--max_steps", "2",
            "--per_device_train_batch_size", str(8 // world_size), "--gradient_accumulation_steps", "2",
            "--per_device_eval_batch_size", str(8 // world_size), "--max_eval_samples", "16",
            # SGD: Adam's first steps (about lr * sign(g)) would turn the float noise of near-zero gradients, which
            # differs with the order of the sums, into visible differences
            "--train_sampling_strategy", "sequential", "--optim", "sgd", "--learning_rate", "0.2",
            "--lr_scheduler_type", "constant", "--sam_rho", "0.05",
            "--sam_sync_perturbation", "true", "--measure_plain_steps", "0", "--report_to", "none",
            "--use_cpu", "true", "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the per-rank result files")
    parser.add_argument("--cli_assets", required=True, help="the models and data files of the CLI runs")
    cli = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for name in TRAINER_RUNS:
        results[name] = run_trainer(name, os.path.join(cli.out, name), world_size=2)
    from hf_lwsam.cli.train import run

    for task in CLI_TASKS:
        metrics = run(cli_argv(task, Path(cli.cli_assets), os.path.join(cli.out, f"cli_{task}"), world_size=2))
        results[f"cli_{task}"] = {"train_loss": metrics["train_loss"], "eval_loss": metrics["eval_loss"]}
    rank = torch.distributed.get_rank()
    for name, result in results.items():
        torch.save({**result, "world_size": torch.distributed.get_world_size()},
                   os.path.join(cli.out, f"{name}_rank{rank}.pt"))
    # Leave no gloo thread to be torn down at interpreter exit (see tests/distributed_worker.py).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
