"""Throughput and peak memory of LW-SAM against plain AdamW and full SAM, through the real Trainer code path.

Every method trains the same GPT-2-shaped (or Llama-shaped: `--preset llama-1b`, `--lora`) model (random init and
random tokens: throughput does not depend on the weights; `--preset smollm2-135m` loads the real pretrained SmolLM2,
full or `--lora`) with the stock `Trainer` loop (or TRL's `SFTTrainer`: `--trainer sft`); a callback times each
optimizer step. Methods are interleaved over several rounds after a warm-up; each round's mean step time is taken
(whole `sam_interval` cycles: warm-up 2 and a multiple of 4 timed steps put SAM steps at the same share as in
training), and the table reports the median over rounds and ratios measured side by side in this one process.
The methods are a table (`methods`) of `study_methods.Method` rows, the type `benchmark_accuracy.py` trains: a new
method is one row, its `sam_*` options in `sam` and any other TrainingArguments in `args`.

Peak memory beside it, both ÷ AdamW: on CUDA `torch.cuda.max_memory_allocated` over each run (model, optimizer
state, activations, SAM's backup); on the CPU, with `--memory`, every method once more in a fresh process of its
own (this process's heap keeps what earlier methods freed), its peak resident set during training (the kernel's
high-water mark VmHWM, reset when training starts) minus its resident set before the model was built.

    python scripts/benchmark_throughput.py                                    # CPU default: 6 layers, d=256, T=128
    python scripts/benchmark_throughput.py --device cuda --bf16 --preset gpt2-350m --json benchmarks/gpu.json
    python scripts/benchmark_throughput.py --preset smollm2-135m --lora        # the real SmolLM2, LoRA (CPU)
    python scripts/benchmark_throughput.py --rounds 5 --steps 40 --methods '^adamw$' '^free preset$' --memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
)
from transformers.utils import logging as hf_logging

from hf_lwsam import LWSAMConfig, LWSAMTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study modules beside this file, also when loaded by path
from step_timer import StepTimer  # noqa: E402
from study_methods import Method  # noqa: E402

PRESETS = {  # layers, d_model, heads, seq_len, batch, vocab
    "cpu": (6, 256, 4, 128, 8, 4096),
    "gpt2-124m": (12, 768, 12, 1024, 16, 50257),
    "gpt2-350m": (24, 1024, 16, 1024, 8, 50257),
    "llama-1b": (16, 2048, 32, 1024, 4, 32000),  # Llama-3.2-1B-like: 8 KV heads, FFN 8192, untied head
    # The real pretrained SmolLM2-135M-Instruct (hf_lwsam.data.smollm2_path(): offline, converted once; Llama, 3 KV
    # heads, tied head); T=64, batch 8 suit the CPU, pass --seq_len / --batch for a GPU
    "smollm2-135m": (30, 576, 9, 64, 8, 49152),
}


GPT2_NORMS = r"transformer\.h\.\d+\.ln_[12]|transformer\.ln_f"  # every normalization layer (SAM-ON's selection)
LLAMA_NORMS = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)|model\.norm"


def methods(n_layer: int, ks: list[int], trunk: str = "transformer.h", norm: str = "transformer.ln_f",
            head: list[str] | None = None, norms: str | None = GPT2_NORMS) -> list[Method]:
    out = [Method("adamw", None), Method("full SAM", dict(sam_selection="all"))]
    # The other plain optimizers of the accuracy studies' baseline grid (`study_methods.PLAIN_OPTIMIZERS`)
    out += [Method("adafactor", None, args=dict(optim="adafactor")),
            Method("sgd momentum 0.9", None, args=dict(optim="sgd", optim_args="momentum=0.9"))]
    for reuse in (False, True):
        for k in ks:
            # The last k blocks and the final norm (GPT-2's lm_head is tied to the input embedding: recomputed only).
            layers = [f"{trunk}.{i}" for i in range(n_layer - k, n_layer)] + [norm] + (head or [])
            label = f"LW-SAM k={k} " + ("reuse" if reuse else "truncated")
            out.append(Method(label, dict(sam_target_layers=layers, sam_reuse_activations=reuse)))
    # Ascent schedules (k=1): one pass at w + e from the previous SAM step's gradient; SAM every 4th step.
    last = [f"{trunk}.{n_layer - 1}", norm] + (head or [])
    out.append(Method("LW-SAM k=1 stale", dict(sam_target_layers=last, sam_ascent="stale")))
    out.append(Method("LW-SAM k=1 reuse interval=4", dict(sam_target_layers=last, sam_interval=4)))
    out.append(Method("full SAM stale", dict(sam_selection="all", sam_ascent="stale")))
    # LookSAM (k=5: SAM every 5th step, the kept component added in between), SAM in the last 30% of the run (timed
    # over the whole run: `run` puts the start at 70% of the timed steps, a multiple of 10), random perturbation.
    for label, sam in (("full SAM", dict(sam_selection="all")),
                       ("LW-SAM k=1 reuse", dict(sam_target_layers=last))):
        out.append(Method(f"{label} LookSAM interval=5", dict(sam, sam_interval=5, sam_interval_reuse="looksam"),
                          cycle=5))
        out.append(Method(f"{label} late from 70%", dict(sam, sam_start=0.7), cycle=10))
    # Later and shorter late phases of full SAM: the last 20%, 10% and 5% of the run.
    for start, cycle in ((0.8, 10), (0.9, 10), (0.95, 20)):
        out.append(Method(f"full SAM late from {start:.0%}", dict(sam_selection="all", sam_start=start),
                          cycle=cycle))
    out.append(Method("full random", dict(sam_selection="all", sam_ascent="random")))
    out.append(Method("full momentum", dict(sam_selection="all", sam_ascent="momentum")))  # one pass, Momentum-SAM
    out.append(Method("free preset", dict(sam_preset="free")))  # the recommended mode as it is defined today
    out.append(Method("LW-SAM k=1 random", dict(sam_target_layers=last, sam_ascent="random")))
    out.append(Method("LW-SAM k=1 momentum", dict(sam_target_layers=last, sam_ascent="momentum")))
    if norms is not None:  # the normalization layers only: in every block, so the ascent runs the full depth
        out += [Method("norms", dict(sam_target_layers=norms)),
                Method("norms stale", dict(sam_target_layers=norms, sam_ascent="stale")),
                Method("norms late from 70%", dict(sam_target_layers=norms, sam_start=0.7), cycle=10)]
    return out


def timed_steps(method: Method, steps: int) -> int:
    """`steps` rounded up to whole cycles of `method` (same share of SAM steps as in a long run)."""
    return -(-steps // method.cycle) * method.cycle


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids as a causal-LM dataset (no `datasets` dependency, so it runs on a bare GPU image)."""

    def __init__(self, rows: int, seq_len: int, vocab: int):
        self.ids = torch.randint(0, vocab, (rows, seq_len))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the process's peak RSS (VmHWM) to its RSS now
            f.write("5")
    except OSError:  # a kernel that refuses it: the peak since the process started (a fresh one: the model's build)
        pass


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (`VmRSS`) or its high-water mark (`VmHWM`), from /proc/self/status."""
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_bytes(device: str) -> int:
    """The peak since `reset_peak_memory`: allocated CUDA memory, or the CPU process's resident set."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else resident_bytes("VmHWM")


def trainer_classes(a) -> tuple[type, type, type, type]:
    """(plain trainer, its config, LW-SAM trainer, its config) for `--trainer`."""
    if a.trainer == "sft":
        import trl

        from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer
        return trl.SFTTrainer, trl.SFTConfig, SFTLWSAMTrainer, SFTLWSAMConfig
    return Trainer, LWSAMConfig, LWSAMTrainer, LWSAMConfig


def run(method: Method, model, data, a, steps: int) -> tuple[list[float], int]:
    sam = dict(method.sam or {})
    if isinstance(sam.get("sam_start"), float):  # late phase: the fraction of the timed steps, after the warm-up
        sam["sam_start"] = a.warmup + round(sam["sam_start"] * (steps - a.warmup))
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"), per_device_train_batch_size=a.batch, max_steps=steps,
        learning_rate=1e-4, optim="adamw_torch_fused" if a.device == "cuda" else "adamw_torch",
        bf16=a.bf16, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=a.device == "cpu", dataloader_num_workers=0, seed=0,
    )
    plain_cls, plain_config, sam_cls, sam_config = trainer_classes(a)
    extra = {}
    if a.trainer == "sft":  # SFTConfig's own defaults otherwise (non-reentrant activation checkpointing unless off)
        common.update(max_length=a.seq_len, activation_checkpointing=a.sft_checkpointing)
        extra = dict(processing_class=a.tokenizer)
    timer = StepTimer(a.device)
    common = method.training_args(common)  # the row's own TrainingArguments on top
    if method.sam is None:
        trainer = plain_cls(model=model, args=plain_config(**common), train_dataset=data, callbacks=[timer], **extra)
    else:
        trainer = sam_cls(model=model, args=sam_config(**common, **sam), train_dataset=data, callbacks=[timer],
                          **extra)
    trainer.remove_callback(PrinterCallback)
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(a.device)
    trainer.train()
    peak = peak_memory_bytes(a.device)
    model.zero_grad(set_to_none=True)
    del trainer
    return timer.times[a.warmup :], peak


def memory_measure(a) -> str | None:
    """What the peak memory column measures, for the JSON file."""
    if a.device == "cuda":
        return "cuda max_memory_allocated during training, the highest over the rounds"
    if a.memory:
        return ("peak RSS during training (VmHWM) minus the RSS before the model was built, each method in a fresh "
                "process")
    return None


def memory_in_fresh_process(a, preset: str, name: str) -> int:
    """Method `name` trained once (warm-up and one round's steps) in a fresh process of this script: its peak resident
    set during training minus its resident set before the model was built, in bytes."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--preset", preset, "--device", a.device,
            "--k", *map(str, a.k), "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
            "--seq_len", str(a.seq_len), "--trainer", a.trainer, "--sft_checkpointing", str(a.sft_checkpointing),
            *(["--bf16"] if a.bf16 else []), *(["--lora"] if a.lora else []), "--memory_of", name]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the memory run of {name!r} failed:\n{done.stderr[-3000:]}")
    return int(next(line.split("=")[1] for line in done.stdout.splitlines() if line.startswith("peak_bytes=")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model shape (default: cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="output-side blocks perturbed")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all methods")
    p.add_argument("--steps", type=int, default=8,
                   help="timed optimizer steps per method and round (a multiple of 4: sam_interval=4 runs SAM on "
                        "every 4th step, so a round's mean covers whole cycles; LookSAM's interval 5 and the late "
                        "phase round it up to a multiple of 5 and 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default: the preset's)")
    p.add_argument("--seq_len", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=None,
                   help="only methods whose name contains one of these (regular expressions: 'full SAM$' is full SAM "
                        "alone)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--lora", action="store_true", help="llama / smollm2 presets: LoRA r=16 on all linear layers")
    p.add_argument("--trainer", choices=["trainer", "sft"], default="trainer",
                   help="the bare Trainer (default), or TRL's SFTTrainer against SFTLWSAMTrainer (needs trl)")
    p.add_argument("--sft_checkpointing", type=int, choices=[0, 1], default=1,
                   help="--trainer sft: activation checkpointing (SFTConfig's default is on)")
    p.add_argument("--memory", action="store_true",
                   help="CPU: also measure every method's peak memory, each in a fresh process of its own after the "
                        "timed rounds (its peak resident set minus its resident set before the model is built). CUDA "
                        "always reports max_memory_allocated from the timed runs")
    p.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)  # the fresh process of one method
    a = p.parse_args()
    preset = a.preset or ("gpt2-124m" if a.device == "cuda" else "cpu")
    n_layer, d, heads, seq_len, batch, vocab = PRESETS[preset]
    a.seq_len, a.batch = a.seq_len or seq_len, a.batch or batch
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    before_model = resident_bytes()

    if preset == "smollm2-135m":
        from transformers import AutoModelForCausalLM

        from hf_lwsam.data import smollm2_path
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    elif preset.startswith("llama"):
        config = LlamaConfig(num_hidden_layers=n_layer, hidden_size=d, num_attention_heads=heads, num_key_value_heads=8,
                             intermediate_size=4 * d, max_position_embeddings=a.seq_len, vocab_size=vocab,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    if preset.startswith(("llama", "smollm2")):
        model.loss_type = "ForCausalLM"
        if a.bf16:
            model = model.to(torch.bfloat16)  # a 1B model is fine-tuned in bf16 weights, not fp32 + autocast
        if a.lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        tied = model.config.tie_word_embeddings  # a tied lm_head is the input embedding: recomputed, not perturbed
        todo_methods = methods(n_layer, a.k, trunk="model.layers", norm="model.norm",
                               head=None if a.lora or tied else ["lm_head"],
                               norms=None if a.lora else LLAMA_NORMS)  # LoRA: the norms are frozen
    else:
        config = GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, n_positions=a.seq_len, vocab_size=vocab)
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"
        todo_methods = methods(n_layer, a.k)
    n_rows = a.batch * (max(timed_steps(m, a.steps) for m in todo_methods) + a.warmup)
    data = RandomTokens(n_rows, a.seq_len, vocab)
    if a.trainer == "sft":  # TRL takes a datasets.Dataset (pre-tokenized: no tokenization), and a tokenizer for padding
        from datasets import Dataset

        from hf_lwsam.data import train_byte_bpe
        data = Dataset.from_dict({"input_ids": data.ids.tolist()})
        a.tokenizer = train_byte_bpe(["padding only: the ids are random"], 300)
    todo = [m for m in todo_methods if a.methods is None or any(re.search(s, m.name) for s in a.methods)]
    cpu = f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    device_name = torch.cuda.get_device_name() if a.device == "cuda" else cpu
    print(f"{a.trainer} {preset}: {n_layer} layers, d={d}, T={a.seq_len}, batch={a.batch}, vocab={vocab}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, device={device_name}, bf16={a.bf16}")
    if a.memory_of is not None:  # one method in this fresh process: its memory only
        method = next(m for m in todo_methods if m.name == a.memory_of)
        _, peak = run(method, model, data, a, a.warmup + timed_steps(method, a.steps))
        print(f"peak_bytes={peak - before_model}")
        return

    times: dict[str, list[float]] = {m.name: [] for m in todo}
    peaks: dict[str, int] = {m.name: 0 for m in todo}
    for r in range(a.rounds):
        order = todo if r % 2 == 0 else todo[::-1]  # alternate the order so drift hits every method alike
        for m in order:
            t, peak = run(m, model, data, a, a.warmup + timed_steps(m, a.steps))
            times[m.name].append(statistics.mean(t))  # a round's mean step time: with sam_interval, whole cycles
            peaks[m.name] = max(peaks[m.name], peak)
            print(f"  round {r + 1}/{a.rounds} {m.name:28s} mean {statistics.mean(t) * 1e3:8.1f} ms/step", flush=True)
    if a.device == "cpu":  # this process's resident set also holds what earlier methods freed: a fresh one each
        peaks = {}
        for m in todo if a.memory else []:
            peaks[m.name] = memory_in_fresh_process(a, preset, m.name)
            print(f"  memory {m.name:28s} peak {peaks[m.name] / 2**30:.3f} GiB above the resident set before the "
                  "model", flush=True)

    tokens = a.batch * a.seq_len
    base = statistics.median(times["adamw"]) if "adamw" in times else None
    rows = []
    for m in todo:
        ms = statistics.median(times[m.name])
        peak = peaks.get(m.name)
        rows.append(dict(method=m.name, ms_per_step=ms * 1e3, tokens_per_s=tokens / ms,
                         ratio_to_adamw=(base / ms) if base else None,
                         peak_gib=peak / 2**30 if peak is not None else None,
                         peak_ratio=peak / peaks["adamw"] if peak is not None and "adamw" in peaks else None))
    print("\n| method | ms/step | tokens/s | ÷ AdamW | peak GiB | peak ÷ AdamW |\n|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio_to_adamw']:.3f}" if r["ratio_to_adamw"] else "-"
        peak = f"{r['peak_gib']:.3f}" if r["peak_gib"] is not None else "-"
        peak_ratio = f"{r['peak_ratio']:.3f}" if r["peak_ratio"] is not None else "-"
        print(f"| {r['method']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {ratio} | {peak} | {peak_ratio} |")
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(trainer=a.trainer, preset=preset, device=device_name, bf16=a.bf16, batch=a.batch,
                           seq_len=a.seq_len,
                           rounds=a.rounds, steps=a.steps, peak_memory=memory_measure(a), results=rows), f,
                      indent=2)


if __name__ == "__main__":
    main()
