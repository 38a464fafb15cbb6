#!/usr/bin/env python
"""The GPU half of the "works with" matrix (tests/test_works_with.py is the CPU half): LW-SAM with the switches that
need CUDA, each checked against an independent computation. Prints a PASS / FAIL / SKIP table and exits non-zero on any
FAIL (a SKIP is a switch whose package is not installed: it is reported, not counted as passed). Under 2 minutes on an
H100/H200; run from the repo root: `python scripts/gpu_check_works_with.py`.

Cells (tiny Llama from a config, real Shakespeare bytes, SGD lr 1 unless said, rho 0.5, fp32 with TF32 off):
- use_liger_kernel: Liger's kernels and its fused linear cross-entropy (whose backward is computed in the forward):
  the default selection with reuse on, one step, equals `reference_update` (plain PyTorch loss) <= 1e-5.
- qlora-4bit: a 4-bit NF4 base (`BitsAndBytesConfig(load_in_4bit=True)`) + LoRA: only LoRA adapters are perturbed, the
  4-bit base weights are bit-identical after training, and the LoRA update equals `reference_update` on the same
  quantized model <= 1e-5.
- paged_adamw_8bit: the optimizer's step on LW-SAM's `.grad` equals the same optimizer stepping on the formula's SAM
  gradient <= 1e-5.
- flash-attention varlen + padding_free (TRL SFT, bf16: flash attention has no fp32): the same selection as sdpa,
  reuse on, and the update agrees with the same run under sdpa's packed-sequence mask (cosine > 0.99).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # run from a checkout; the shared formula helpers live in tests/

import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

from conftest import shakespeare_lm_dataset, tiny_llama  # noqa: E402
from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402
from test_update_math import _batches, _rel, reference_update  # noqa: E402

RHO = 0.5


class Skip(Exception):
    """A switch whose package is not installed here."""


def need(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise Skip(f"{', '.join(missing)} not installed")


def args(out: str, **overrides) -> LWSAMConfig:
    kwargs = dict(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                  learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                  warmup_steps=0, train_sampling_strategy="sequential", report_to="none", save_strategy="no",
                  logging_steps=1, disable_tqdm=True, seed=0, sam_rho=RHO)
    kwargs.update(overrides)
    return LWSAMConfig(**kwargs)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def cuda_batches(data) -> list[dict[str, torch.Tensor]]:
    return [{k: v.cuda() for k, v in b.items()} for b in _batches(data)]


# ---------------------------------------------------------------------------------------------------------- cells
def liger(out: str) -> str:
    need("liger_kernel")
    data = shakespeare_lm_dataset(4)
    model = tiny_llama(n_layer=3).cuda()
    start, reference = weights(model), copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=args(out, use_liger_kernel=True), train_dataset=data)
    assert any(type(m).__module__.startswith("liger_kernel") for m in trainer.model.modules()), "Liger not applied"
    trainer.train()
    names = trainer.perturbed_parameter_names()
    assert "lm_head.weight" in names, names
    assert trainer.reuse_disabled_reason is None, trainer.reuse_disabled_reason
    expected = reference_update(reference, cuda_batches(data), names, RHO, causal=True)
    r = _rel(weights(model), expected, start)
    assert r <= 1e-5, f"relative difference {r:.2e} > 1e-5"
    return f"rel {r:.1e}, {len(names)} tensors perturbed, reuse on"


def qlora(out: str) -> str:
    need("bitsandbytes", "peft")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    path = os.path.join(out, "tiny-llama")
    tiny_llama(n_layer=3).save_pretrained(path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)

    def load():
        base = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map={"": 0})
        torch.manual_seed(1)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               lora_dropout=0.0, init_lora_weights=False))

    data = shakespeare_lm_dataset(4)
    model, reference = load(), load()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(p.dtype == torch.uint8 for p in frozen.values()), "no 4-bit base weights"
    start = weights(model)
    trainer = LWSAMTrainer(model=model, args=args(out), train_dataset=data)
    trainer.train()
    names = trainer.perturbed_parameter_names()
    assert names and all(".lora_" in n for n in names), names
    after = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(frozen[n], after[n]) for n in frozen), "the 4-bit base was written"
    expected = reference_update(reference, cuda_batches(data), names, RHO, causal=True)
    r = _rel(weights(model), expected, start)
    assert r <= 1e-5, f"relative difference {r:.2e} > 1e-5"
    return (f"rel {r:.1e}, {len(names)} LoRA tensors perturbed, {len(frozen)} frozen base tensors unchanged, "
            f"reuse {'on' if trainer.reuse_disabled_reason is None else 'off: ' + trainer.reuse_disabled_reason}")


def paged_adamw_8bit(out: str) -> str:
    need("bitsandbytes")
    data = shakespeare_lm_dataset(4)
    model = tiny_llama(n_layer=3).cuda()
    start, reference = weights(model), copy.deepcopy(model)
    run_args = args(out, optim="paged_adamw_8bit", learning_rate=1e-2)
    trainer = LWSAMTrainer(model=model, args=run_args, train_dataset=data)
    trainer.train()
    names = trainer.perturbed_parameter_names()
    sam_step = reference_update(copy.deepcopy(reference), cuda_batches(data), names, RHO, causal=True)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(run_args, reference)
    params = [p for p in reference.parameters() if p.requires_grad]
    for (n, _), p in zip(reference.named_parameters(), params):
        p.grad = (start[n] - sam_step[n]).clone()  # SGD lr 1: w - w_new is the SAM gradient
    optimizer_cls([{"params": params, "weight_decay": run_args.weight_decay}], **kwargs).step()
    r = _rel(weights(model), weights(reference), start)
    assert r <= 1e-5, f"relative difference {r:.2e} > 1e-5 ({optimizer_cls.__name__})"
    return f"rel {r:.1e} ({optimizer_cls.__name__})"


def flash_varlen(out: str) -> str:
    need("trl")
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("kernels") is None:
        raise Skip("flash_attn not installed")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import shakespeare_paragraphs, tiny_tokenizer
    from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer

    def run(attention: str):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=attention)).to("cuda", torch.bfloat16)
        start = weights(model)
        config = SFTLWSAMConfig(output_dir=os.path.join(out, attention), padding_free=True, max_length=None, bf16=True,
                                per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                                learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                                max_grad_norm=0.0, warmup_steps=0, report_to="none", save_strategy="no",
                                disable_tqdm=True, seed=0, train_sampling_strategy="sequential", sam_rho=RHO)
        trainer = SFTLWSAMTrainer(model=model, args=config, processing_class=tiny_tokenizer(),
                                  train_dataset=Dataset.from_dict({"text": shakespeare_paragraphs(8)}))
        trainer.train()
        update = torch.cat([(p.detach() - start[n]).float().flatten() for n, p in model.named_parameters()
                            if p.requires_grad])
        return update, trainer

    flash, trainer = run("flash_attention_2")
    sdpa, reference = run("sdpa")
    assert trainer.padding_free and trainer.reuse_disabled_reason is None, trainer.reuse_disabled_reason
    assert trainer.perturbed_parameter_names() == reference.perturbed_parameter_names()
    cosine = float(torch.nn.functional.cosine_similarity(flash, sdpa, dim=0))
    assert cosine > 0.99, f"cosine {cosine:.4f} <= 0.99"
    return f"cosine {cosine:.5f} to sdpa's packed mask (bf16), reuse on"


CELLS = {
    "use_liger_kernel": liger,
    "qlora-4bit": qlora,
    "paged_adamw_8bit": paged_adamw_8bit,
    "flash-attention varlen + padding_free": flash_varlen,
}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check_works_with: no CUDA device")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the <= 1e-5 checks
    torch.backends.cudnn.allow_tf32 = False
    rows, failed = [], False
    for name, cell in CELLS.items():
        with tempfile.TemporaryDirectory() as out:
            try:
                rows.append((name, "PASS", cell(out)))
            except Skip as e:
                rows.append((name, "SKIP", str(e)))
            except Exception as e:  # a failed check or a crash: both are failures of the cell
                traceback.print_exc()
                rows.append((name, "FAIL", f"{type(e).__name__}: {e}"[:300]))
                failed = True
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'switch'.ljust(width)} | result | detail")
    for name, verdict, detail in rows:
        print(f"{name.ljust(width)} | {verdict.ljust(6)} | {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
