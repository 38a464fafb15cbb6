#!/usr/bin/env python
"""`LWSAMTrainer` under FSDP2 on GPUs, launched as users launch it (a few minutes on one H100/H200):

    accelerate launch --config_file scripts/accelerate_configs/fsdp2.yaml scripts/gpu_check_fsdp2.py

Checks (PASS/FAIL each; exit 1 on any failure):
- the Trainer sharded the model (parameters are DTensors) and activation reuse is off with the FSDP2 reason;
- one fp32 SGD step (lr 1, two micro-batches per process) equals LW-SAM on the global batch computed by hand on an
  unsharded copy (relative difference <= 1e-5), and g_S is not zero;
- bf16, GPT-2 350M shape (T=1024, batch 8 per process): throughput and peak memory of AdamW, LW-SAM k=1 and k=1 stale
  under FSDP2, interleaved over 2 rounds (round means over 8 steps, median of rounds); printed as a table.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer  # noqa: E402

from benchmark_throughput import RandomTokens  # noqa: E402
from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402
from step_timer import StepTimer  # noqa: E402

RHO, FAILED = 0.5, []


def check(name: str, ok: bool, detail: str = "") -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def gpt2(n_layer: int, d: int, heads: int, seq: int, vocab: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=seq, vocab_size=vocab,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.loss_type = "ForCausalLM"
    return model


def reference_step(model: GPT2LMHeadModel, batches: list[dict], selected: list[str]) -> dict[str, torch.Tensor]:
    """LW-SAM (SGD, lr 1) on every process's micro-batches, by hand: per micro-batch k, g_S is the mean over
    processes of their micro-batch-k gradients (FSDP2 uses one common e_S); the update is the sum over k of the mean
    over processes of the gradients at the perturbed point. Losses: each micro-batch's summed token loss / the
    window's token count per process, as the Trainer normalises them with num_items_in_batch."""
    model = model.cuda()
    params = dict(model.named_parameters())
    sel = [params[n] for n in selected]
    world = len(batches[0])
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = sum((b["labels"][:, 1:] != -100).sum() for step in batches for b in step) / world
    for step in batches:  # step k: one micro-batch per process
        def loss_of(b):
            logits = model(input_ids=b["input_ids"].cuda()).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"][:, 1:].cuda().flatten(),
                                                     reduction="sum") / count
        g = [sum(gs) / world for gs in zip(*[torch.autograd.grad(loss_of(b), sel) for b in step])]
        norm = torch.sqrt(sum((x ** 2).sum() for x in g))
        with torch.no_grad():
            for p, x in zip(sel, g):
                p.add_(RHO * x / norm)
        for b in step:
            for (n, _), x in zip(params.items(), torch.autograd.grad(loss_of(b), list(params.values()))):
                total[n] += x / world
        with torch.no_grad():
            for p, x in zip(sel, g):
                p.sub_(RHO * x / norm)
    return {n: (p - total[n]).detach() for n, p in params.items()}


def correctness() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = RandomTokens(4 * world, 64, 256)  # 2 micro-batches of 2 per process
    rows = lambda idx: {"input_ids": data.ids[idx], "labels": data.ids[idx]}  # noqa: E731
    # accelerate's sharding with sequential sampling: process r reads batch k * world + r at micro-batch k.
    batches = [[rows(slice((k * world + r) * 2, (k * world + r + 1) * 2)) for r in range(world)] for k in range(2)]
    args = LWSAMConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                       weight_decay=0.0, warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1,
                       train_sampling_strategy="sequential", sam_rho=RHO, disable_tqdm=True)
    model = gpt2(3, 64, 4, 64, 256)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = LWSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    selected = trainer.perturbed_parameter_names()
    sharded = all(isinstance(p, DTensor) for p in trainer.model.parameters())
    check("parameters sharded (DTensor)", sharded)
    check("activation reuse off under FSDP2", "FSDP2" in (trainer.reuse_disabled_reason or ""),
          repr(trainer.reuse_disabled_reason))
    got = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float()
           for n, p in trainer.model.named_parameters()}
    ref_model = gpt2(3, 64, 4, 64, 256)
    expected = reference_step(ref_model, batches, selected)
    num = sum(((got[n] - expected[n]) ** 2).sum() for n in expected)
    den = sum(((expected[n] - start[n].cuda()) ** 2).sum() for n in expected)
    rel = float(torch.sqrt(num / den))
    check("one step equals LW-SAM on the global batch", rel <= 1e-5, f"(relative difference {rel:.2e})")
    norms = [e["sam/grad_norm_selected"] for e in trainer.state.log_history if "sam/grad_norm_selected" in e]
    check("g_S is not zero", bool(norms) and norms[0] > 0, f"(sam/grad_norm_selected {norms})")


def throughput() -> None:
    n_layer, d, heads, seq, batch, vocab = 24, 1024, 16, 1024, 8, 50257
    data = RandomTokens(batch * 10, seq, vocab)
    methods = {"adamw": None, "LW-SAM k=1": dict(sam_target_layers=["transformer.h.23", "transformer.ln_f"]),
               "LW-SAM k=1 stale": dict(sam_target_layers=["transformer.h.23", "transformer.ln_f"],
                                        sam_ascent="stale")}
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, float] = dict.fromkeys(methods, 0.0)
    for r in range(2):
        for name in (methods if r % 2 == 0 else list(methods)[::-1]):
            model = gpt2(n_layer, d, heads, seq, vocab)
            common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=10, bf16=True,
                          learning_rate=1e-4, optim="adamw_torch_fused", report_to="none", save_strategy="no",
                          logging_strategy="no", disable_tqdm=True)
            timer = StepTimer("cuda")
            sam = methods[name]
            cls = Trainer if sam is None else LWSAMTrainer
            args = LWSAMConfig(**common, **(sam or {}))
            trainer = cls(model=model, args=args, train_dataset=data, callbacks=[timer])
            trainer.remove_callback(PrinterCallback)
            torch.cuda.reset_peak_memory_stats()
            trainer.train()
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
            times[name].append(statistics.mean(timer.times[2:]))
            del trainer, model
            torch.cuda.empty_cache()
    base = statistics.median(times["adamw"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nFSDP2, {torch.cuda.get_device_name()} x {os.environ.get('WORLD_SIZE', '1')}, GPT-2 350M shape, "
              f"bf16, T={seq}, batch {batch} per process\n| method | ms/step | ÷ AdamW | peak GiB | peak ÷ AdamW |\n"
              "|---|---|---|---|---|")
        for name in methods:
            ms = statistics.median(times[name])
            peak = peaks[name]
            print(f"| {name} | {ms * 1e3:.1f} | {base / ms:.3f} | {peak:.2f} | {peak / peaks['adamw']:.3f} |")


if __name__ == "__main__":
    correctness()
    throughput()
    sys.exit(1 if FAILED else 0)
