"""LW-SAM inside TRL's `SFTTrainer` and `DPOTrainer` (`hf_lwsam.trl`), on tiny GPT-2s, an in-process tokenizer and
real text (a Shakespeare play; tweets with their sentiment as preference pairs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import shakespeare_paragraphs, tiny_tokenizer
from hf_lwsam import LWSAMConfigMixin, LWSAMTrainer, lwsam_config, lwsam_trainer

trl = pytest.importorskip("trl")
from hf_lwsam.trl import DPOLWSAMConfig, DPOLWSAMTrainer, SFTLWSAMConfig, SFTLWSAMTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_lm(seed: int = 0, n_layer: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tiny_tokenizer()), n_positions=64, n_embd=32, n_layer=n_layer, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def sft_data(n: int = 16) -> Dataset:
    return Dataset.from_dict({"text": shakespeare_paragraphs(n)})


def preference_data(n: int = 8) -> Dataset:
    """Real tweets: the prompt asks for the sentiment, chosen is the true label, rejected another one."""
    from hf_lwsam.data import TWEET_LABELS, load_tweets

    tweets = load_tweets()["train"].select(range(n))
    return Dataset.from_dict({
        "prompt": [f"Tweet: {t[:40]}\nSentiment:" for t in tweets["text"]],
        "chosen": [f" {TWEET_LABELS[y]}" for y in tweets["label"]],
        "rejected": [f" {TWEET_LABELS[(y + 1) % 3]}" for y in tweets["label"]],
    })


COMMON = dict(use_cpu=True, bf16=False, max_length=32, per_device_train_batch_size=2, gradient_accumulation_steps=2,
              report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
              train_sampling_strategy="sequential")
SGD = dict(optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
           warmup_steps=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sft(trainer_cls, config_cls, tmp_path, model=None, data=None, **overrides):
    args = config_cls(output_dir=str(tmp_path / "sft"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-2,
                                                           **overrides})
    trainer = trainer_cls(model=model or tiny_lm(), args=args, train_dataset=data or sft_data(),
                          processing_class=tiny_tokenizer())
    trainer.train()
    assert trainer.state.global_step == args.max_steps
    return trainer


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


# ------------------------------------------------------------------------------------------- config, factories
def test_factories_return_one_class_per_base_and_keep_trl_defaults():
    assert lwsam_config(trl.SFTConfig) is SFTLWSAMConfig is lwsam_config(trl.SFTConfig)
    assert lwsam_trainer(trl.SFTTrainer) is SFTLWSAMTrainer is lwsam_trainer(trl.SFTTrainer)
    assert lwsam_trainer(SFTLWSAMTrainer) is SFTLWSAMTrainer and lwsam_config(SFTLWSAMConfig) is SFTLWSAMConfig
    from transformers import Trainer, TrainingArguments

    from hf_lwsam import LWSAMConfig
    assert lwsam_trainer(Trainer) is LWSAMTrainer and lwsam_config(TrainingArguments) is LWSAMConfig
    ours, theirs = SFTLWSAMConfig(output_dir="x", use_cpu=True), trl.SFTConfig(output_dir="x", use_cpu=True)
    for name in ("activation_checkpointing", "logging_steps", "bf16", "learning_rate", "max_length"):
        assert getattr(ours, name) == getattr(theirs, name), name  # TRL's own defaults survive
    assert ours.sam_rho == 0.05 and isinstance(ours, trl.SFTConfig) and isinstance(ours, LWSAMConfigMixin)
    with pytest.raises(ValueError, match="sam_rho=-1"):
        DPOLWSAMConfig(output_dir="x", use_cpu=True, sam_rho=-1)
    with pytest.raises(ValueError, match="is not a TrainingArguments subclass"):
        lwsam_config(dict)
    with pytest.raises(ValueError, match="is not a Trainer subclass"):
        lwsam_trainer(dict)


def test_a_plain_sft_config_is_converted_keeping_every_value(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path / "x"), **{**COMMON, "max_length": 24}, max_steps=1,
                         learning_rate=3e-3)
    trainer = SFTLWSAMTrainer(model=tiny_lm(), args=args, train_dataset=sft_data(4), processing_class=tiny_tokenizer())
    assert type(trainer.args) is SFTLWSAMConfig and trainer.args.sam_rho == 0.05
    for name in ("learning_rate", "max_length", "per_device_train_batch_size", "activation_checkpointing"):
        assert getattr(trainer.args, name) == getattr(args, name), name


def test_rloo_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="RLOOTrainer is not supported by hf_lwsam: its loss always weighs"):
        lwsam_trainer(trl.RLOOTrainer)(model=tiny_lm(), reward_funcs=[lambda **kw: [0.0]], args=None)


def test_importing_hf_lwsam_trl_without_trl_says_how_to_install():
    code = "import sys; sys.modules['trl'] = None\ntry:\n import hf_lwsam.trl\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert 'pip install "trl>=1.16"' in out and 'pip install -e ".[trl]"' in out


# --------------------------------------------------------------------------------------------------- SFT
def test_sft_rho_zero_equals_plain_sft_bit_for_bit(tmp_path):
    plain = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path)
    ours = sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, sam_rho=0.0)
    a, b = weights(plain.model), weights(ours.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert ours.reuse_disabled_reason is None  # SFTConfig's default non-reentrant checkpointing with reuse on


def test_sft_metrics_and_token_counts_are_recorded_once(tmp_path):
    plain = sft(trl.SFTTrainer, trl.SFTConfig, tmp_path, max_steps=1)
    ours = sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, max_steps=1, sam_rho=0.5)
    assert logged(ours, "num_tokens") == logged(plain, "num_tokens") and logged(ours, "num_tokens")[0] > 0
    # Pass 1 is the plain forward at w: the same entropy and accuracy as plain SFT's first step.
    for key in ("entropy", "mean_token_accuracy", "loss"):
        assert logged(ours, key) == pytest.approx(logged(plain, key), rel=1e-6), key
    assert logged(ours, "sam/sharpness")[0] != 0.0


def _sft_reference_step(tmp_path, rho: float, make_model=tiny_lm, selected_names: list[str] | None = None,
                        **overrides) -> dict[str, torch.Tensor]:
    """One SGD(lr=1) step by hand: w - sum_b grad L_b(w_S + e_S^b), e_S^b = rho g_S^b / ||g_S^b||, with L_b TRL's SFT
    loss of micro-batch b as `SFTTrainer.compute_loss` computes it (summed token loss / the window's token count), on
    the batches TRL's own collator makes with the SFTConfig `overrides` (e.g. packing). `selected_names`: S (default:
    tiny_lm's last block and final norm)."""
    plain = trl.SFTTrainer(model=make_model(), args=trl.SFTConfig(output_dir=str(tmp_path / "ref"),
                                                                  **{**COMMON, **SGD, "max_steps": 1, **overrides}),
                           train_dataset=sft_data(), processing_class=tiny_tokenizer())
    model = plain.model
    iterator = iter(plain.get_train_dataloader())
    batches, num_items = plain.get_batch_samples(iterator, 2, model.device)
    selected = [p for n, p in model.named_parameters()
                if (n in selected_names if selected_names is not None
                    else n.startswith(("transformer.h.2.", "transformer.ln_f.")))]
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    model.train()
    for batch in batches:
        loss = plain.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        g = torch.autograd.grad(loss, selected)
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        saved = [p.detach().clone() for p in selected]
        with torch.no_grad():
            for p, gi in zip(selected, g):
                p.add_(rho * gi / norm)
        grads = torch.autograd.grad(plain.compute_loss(model, dict(batch), num_items_in_batch=num_items), params)
        with torch.no_grad():
            for p, s in zip(selected, saved):
                p.copy_(s)
        total = [t + gi for t, gi in zip(total, grads)]
    return {n: (p - t).detach() for (n, p), t in zip(model.named_parameters(), total)}


def test_one_sft_step_equals_the_lwsam_formula_on_trls_loss(tmp_path):
    expected = _sft_reference_step(tmp_path, rho=0.5)
    trainer = sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, **SGD, max_steps=1, sam_rho=0.5)
    assert trainer.perturbed_parameter_names() == [n for n in expected if n.startswith(("transformer.h.2.",
                                                                                         "transformer.ln_f."))]
    got = weights(trainer.model)
    start = weights(tiny_lm())
    num = sum(((got[n] - expected[n]).double() ** 2).sum() for n in got)
    den = sum(((expected[n] - start[n]).double() ** 2).sum() for n in got)
    assert float(torch.sqrt(num / den)) <= 1e-5


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sft_reuse_equals_recompute_with_accumulation_and_checkpointing(checkpointing, tmp_path):
    runs = [sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, **{**SGD, "learning_rate": 0.1}, max_steps=2, sam_rho=0.5,
                sam_reuse_activations=reuse, activation_checkpointing=checkpointing) for reuse in (True, False)]
    assert runs[0].args.activation_checkpointing is checkpointing and runs[0].reuse_disabled_reason is None
    a, b = weights(runs[0].model), weights(runs[1].model)
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in a)
    assert float(torch.sqrt(num / sum((b[n].double() ** 2).sum() for n in b))) <= 1e-6


# --------------------------------------------------------------------------------------------------- DPO
def dpo(trainer_cls, config_cls, tmp_path, model=None, ref_model=None, **overrides):
    args = config_cls(output_dir=str(tmp_path / "dpo"), **{**COMMON, "max_steps": 2, "learning_rate": 1e-2,
                                                           "max_length": 64, **overrides})
    model = model or tiny_lm()
    trainer = trainer_cls(model, ref_model, args=args, train_dataset=preference_data(),  # DPO's positional order
                          processing_class=tiny_tokenizer())
    trainer.train()
    assert trainer.state.global_step == args.max_steps and len(trainer.train_dataset) == 8  # nothing filtered out
    return trainer


def test_dpo_rho_zero_equals_plain_dpo_and_metrics_are_recorded_once(tmp_path):
    plain = dpo(trl.DPOTrainer, trl.DPOConfig, tmp_path, ref_model=tiny_lm())
    ours = dpo(DPOLWSAMTrainer, DPOLWSAMConfig, tmp_path, ref_model=tiny_lm(), sam_rho=0.0)
    a, b = weights(plain.model), weights(ours.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    for key in ("num_tokens", "rewards/chosen", "rewards/margins", "logps/rejected", "loss"):
        assert logged(ours, key) == pytest.approx(logged(plain, key), rel=1e-6), key


def test_dpo_with_a_reference_model_trains_and_counts_tokens_once(tmp_path):
    plain = dpo(trl.DPOTrainer, trl.DPOConfig, tmp_path, ref_model=tiny_lm(), max_steps=1)
    ours = dpo(DPOLWSAMTrainer, DPOLWSAMConfig, tmp_path, ref_model=tiny_lm(), max_steps=1, sam_rho=0.5)
    assert logged(ours, "num_tokens") == logged(plain, "num_tokens")
    assert logged(ours, "rewards/chosen") == pytest.approx(logged(plain, "rewards/chosen"), rel=1e-6)
    assert logged(ours, "sam/sharpness")[0] != 0.0 and ours.reuse_disabled_reason is None
    assert not all(torch.equal(a, b) for a, b in zip(weights(ours.model).values(), weights(plain.model).values()))


def lora_lm():
    from peft import LoraConfig, get_peft_model

    model = tiny_lm()
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                            init_lora_weights=False, fan_in_fan_out=True))


def test_dpo_with_peft_reference_by_disabled_adapters_reuse_is_exact(tmp_path):
    """DPO with a PEFT model and no reference model computes the reference with the adapters disabled: activation
    reuse must tell that forward from the policy's."""
    runs = [dpo(DPOLWSAMTrainer, DPOLWSAMConfig, tmp_path, model=lora_lm(), **{**SGD, "learning_rate": 0.1},
                sam_rho=0.5, sam_reuse_activations=reuse) for reuse in (True, False)]
    assert runs[0].reuse_disabled_reason is None
    a, b = weights(runs[0].model), weights(runs[1].model)
    trained = [n for n in a if "lora_" in n]
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in trained)
    assert float(torch.sqrt(num / sum((b[n].double() ** 2).sum() for n in trained))) <= 1e-6


# ------------------------------------------------------------------------------------------ two processes
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_sft_under_accelerate_launch_two_processes_are_bit_identical(tmp_path):
    from test_distributed import launch_script

    launch_script(ROOT / "tests" / "trl_sft_worker.py", [str(tmp_path)], timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["reuse_disabled_reason"] is None
    assert all(torch.equal(ranks[0]["end"][n], ranks[1]["end"][n]) for n in ranks[0]["end"])
    assert any(not torch.equal(ranks[0]["end"][n], ranks[0]["start"][n]) for n in ranks[0]["end"])
    assert ranks[0]["sharpness"] and ranks[0]["sharpness"][0] != 0.0


@pytest.mark.parametrize("overrides, sam_steps", [
    (dict(sam_interval=2, sam_interval_reuse="looksam"), [1.0, 0.0, 1.0, 0.0]),
    (dict(sam_start=0.5), [0.0, 0.0, 1.0, 1.0]),
    (dict(sam_ascent="random"), [1.0, 1.0, 1.0, 1.0]),
    (dict(sam_ascent="momentum"), [0.0, 1.0, 1.0, 1.0]),
])
def test_sft_with_looksam_late_phase_and_random_perturbation(overrides, sam_steps, tmp_path):
    """The ascent schedules inside SFTTrainer's step (accumulation 2): SAM where the schedule says, finite losses,
    LookSAM's component added on the steps between, and Momentum-SAM perturbing from SFTConfig's default AdamW's first
    moment (a plain first step, then ||e_S|| = rho)."""
    trainer = sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, max_steps=4, sam_rho=0.5, **overrides)
    assert logged(trainer, "sam/sam_steps") == sam_steps
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))
    if overrides.get("sam_ascent") == "momentum":
        assert logged(trainer, "sam/e_norm") == pytest.approx([0.5] * 3, abs=1e-5)
    if "sam_interval_reuse" in overrides:
        assert logged(trainer, "sam/looksam_steps") == [1.0, 1.0]
