"""LW-SAM inside TRL's `GRPOTrainer` (`hf_lwsam.trl.GRPOLWSAMTrainer`), on a tiny Llama built from a config with the
shipped SmolLM2 tokenizer, real prompts (a Shakespeare play) and a deterministic reward. Every reference below is
TRL's own `GRPOTrainer`, its generation (`_prepare_inputs`) and its loss (`compute_loss`), with the SAM formula
written out by hand around them: nothing of hf_lwsam runs in a reference."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import shakespeare_paragraphs

trl = pytest.importorskip("trl")
from hf_lwsam.trl import GRPOLWSAMConfig, GRPOLWSAMTrainer  # noqa: E402

_TOKENIZER: list = []


def smollm2_tokenizer():
    if not _TOKENIZER:
        from hf_lwsam.data import smollm2_path

        _TOKENIZER.append(AutoTokenizer.from_pretrained(smollm2_path()))
    return _TOKENIZER[0]


def tiny_policy(seed: int = 0) -> LlamaForCausalLM:
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def low_id_tokens(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """A deterministic reward: how many completion tokens have an id in the lower half of the vocabulary."""
    half = len(smollm2_tokenizer()) // 2
    return [float(sum(t < half for t in ids)) for ids in completion_ids]


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [p[:40] for p in shakespeare_paragraphs(n)]})


COMMON = dict(use_cpu=True, bf16=False, per_device_train_batch_size=2, num_generations=2, max_completion_length=6,
              report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, max_steps=2,
              use_vllm=False)
SGD = dict(optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
           warmup_steps=0)
TRUNK_END = ("model.layers.1.", "model.norm.", "lm_head.")  # a Llama's default selection: last block, norm, head


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grpo(trainer_cls, config_cls, tmp_path, eval_dataset=None, **overrides):
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **{**COMMON, **overrides})
    trainer = trainer_cls(model=tiny_policy(), reward_funcs=low_id_tokens, args=args, train_dataset=prompts(),
                          eval_dataset=eval_dataset, processing_class=smollm2_tokenizer())
    trainer.train()
    assert trainer.state.global_step == args.max_steps
    return trainer


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def rel(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """||got - expected|| / ||expected - start||: the error relative to the size of the update."""
    num = sum(((got[n] - expected[n]).double() ** 2).sum() for n in got)
    den = sum(((expected[n] - start[n]).double() ** 2).sum() for n in got)
    assert den > 0
    return float(torch.sqrt(num / den))


# ------------------------------------------------------------------------------------------------ config, classes
def test_the_factories_give_grpolwsam_and_keep_grpos_defaults(tmp_path):
    from hf_lwsam import LWSAMConfigMixin, lwsam_config, lwsam_trainer

    assert lwsam_trainer(trl.GRPOTrainer) is GRPOLWSAMTrainer and lwsam_config(trl.GRPOConfig) is GRPOLWSAMConfig
    ours, theirs = GRPOLWSAMConfig(output_dir="x", use_cpu=True), trl.GRPOConfig(output_dir="x", use_cpu=True)
    for name in ("loss_type", "num_generations", "beta", "epsilon", "steps_per_generation", "learning_rate", "bf16"):
        assert getattr(ours, name) == getattr(theirs, name), name  # TRL's own defaults survive
    assert isinstance(ours, trl.GRPOConfig) and isinstance(ours, LWSAMConfigMixin) and ours.sam_rho == 0.05
    # A plain GRPOConfig is copied, every value kept: the generation batch it derived from generation_batch_size too
    # (GRPOConfig refuses generation_batch_size and steps_per_generation both given).
    plain = trl.GRPOConfig(output_dir=str(tmp_path / "x"), **COMMON, generation_batch_size=8)
    trainer = GRPOLWSAMTrainer(model=tiny_policy(), reward_funcs=low_id_tokens, args=plain, train_dataset=prompts(),
                               processing_class=smollm2_tokenizer())
    assert type(trainer.args) is GRPOLWSAMConfig
    for name in ("max_completion_length", "generation_batch_size", "steps_per_generation", "num_generations"):
        assert getattr(trainer.args, name) == getattr(plain, name), name
    assert (trainer.args.generation_batch_size, trainer.args.steps_per_generation) == (8, 4)


# ------------------------------------------------------------------------------------------------ plain training
@pytest.mark.parametrize("sam", [dict(sam_rho=0.0), dict(sam_start=10)], ids=["rho0", "sam_start_past_the_run"])
def test_grpo_without_sam_equals_grpotrainer_bit_for_bit_with_buffering_and_evaluation(sam, tmp_path):
    """gradient_accumulation_steps=2 and steps_per_generation=4: one generation serves both optimizer steps, the
    second one weighs its loss by importance ratios against the old log-probabilities; an evaluation (which generates
    in eval mode) runs after the first step. The same updates, rewards and metrics as TRL's GRPOTrainer."""
    setup = dict(gradient_accumulation_steps=2, steps_per_generation=4, eval_strategy="steps", eval_steps=1,
                 per_device_eval_batch_size=2)
    plain = grpo(trl.GRPOTrainer, trl.GRPOConfig, tmp_path, eval_dataset=prompts(2), **setup)
    ours = grpo(GRPOLWSAMTrainer, GRPOLWSAMConfig, tmp_path, eval_dataset=prompts(2), **setup, **sam)
    a, b = weights(plain.model), weights(ours.model)
    assert any(not torch.equal(a[n], tiny_policy().state_dict()[n]) for n in a)  # it trained
    assert all(torch.equal(a[n], b[n]) for n in a)
    for key in ("loss", "reward", "reward_std", "entropy", "num_tokens", "clip_ratio/region_mean", "eval_loss"):
        assert logged(ours, key) == logged(plain, key), key
    assert len(logged(ours, "step_time")) == len(logged(plain, "step_time")) == 2


# ----------------------------------------------------------------------------------------------- exact ascent
def with_sampling_log_probs(trainer, model, prepared: dict) -> dict:
    """GRPO's objective at any weights weighs the completions against the policy that sampled them (at w): where
    TRL leaves `old_per_token_logps` unset (on-policy: its loss then takes the pass's own), TRL's log-probs at w."""
    if prepared.get("old_per_token_logps") is not None:
        return prepared
    ids = torch.cat([prepared["prompt_ids"], prepared["completion_ids"]], dim=1)
    mask = torch.cat([prepared["prompt_mask"], prepared["completion_mask"]], dim=1)
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(model, ids, mask, prepared["completion_ids"].size(1))[0]
    return {**prepared, "old_per_token_logps": logps}


class ExactSAMByHand(trl.GRPOTrainer):
    """TRL's GRPOTrainer whose micro-batch is SAM written out: TRL's `_prepare_inputs` at w, g_S of TRL's loss at w,
    e_S = rho g_S / ||g_S||, the gradient of TRL's loss at w + e_S on the same prepared batch into `.grad`."""

    rho = 0.5

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        prepared = with_sampling_log_probs(self, model, self._prepare_inputs(inputs))
        selected = [p for n, p in model.named_parameters() if n.startswith(TRUNK_END)]
        g = torch.autograd.grad(self.compute_loss(model, prepared), selected)
        norm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g)).float()
        saved = [p.detach().clone() for p in selected]
        with torch.no_grad():
            for p, gi in zip(selected, g):
                p.add_(self.rho * gi / norm)
        loss = self.compute_loss(model, prepared)
        loss.backward()
        with torch.no_grad():
            for p, s in zip(selected, saved):
                p.copy_(s)
        self._step += 1  # GRPO's micro-batch counter, which schedules generation
        return loss.detach()


@pytest.mark.parametrize("accumulation", [dict(), dict(gradient_accumulation_steps=2, steps_per_generation=4)],
                         ids=["one_micro_batch", "accumulated_with_old_logps"])
def test_the_exact_ascent_equals_sam_by_hand_on_grpos_loss(accumulation, tmp_path, caplog):
    expected = grpo(ExactSAMByHand, trl.GRPOConfig, tmp_path, **SGD, **accumulation)
    with caplog.at_level(logging.WARNING, logger="hf_lwsam"):
        trainer = grpo(GRPOLWSAMTrainer, GRPOLWSAMConfig, tmp_path, **SGD, **accumulation, sam_rho=ExactSAMByHand.rho)
    # The default selection was traced on GRPO's prepared batch (prompt and completion joined), not left as is.
    assert not any("could not trace" in r.getMessage() for r in caplog.records)
    assert trainer.perturbed_parameter_names() == [n for n in weights(trainer.model) if n.startswith(TRUNK_END)]
    assert trainer.reuse_disabled_reason is None  # pass 2 replayed the first block's outputs from pass 1
    assert logged(trainer, "reward") == logged(expected, "reward")  # the same completions were sampled
    # GRPO's gradient sums advantage-weighted terms that nearly cancel (the advantages of a group sum to zero), which
    # magnifies float32 rounding: two orderings of this same formula (norm in float64 or float32) differ by 3e-5.
    assert rel(weights(trainer.model), weights(expected.model), weights(tiny_policy())) <= 1e-4
    # Metrics once per micro-batch, from the clean pass 1: the first step's are plain GRPO's to the bit (the reference
    # above records both of its passes), and step_time is recorded once per optimizer step.
    plain = grpo(trl.GRPOTrainer, trl.GRPOConfig, tmp_path, **SGD, **accumulation, max_steps=1)
    for key in ("entropy", "loss", "clip_ratio/region_mean", "reward", "num_tokens"):
        assert logged(trainer, key)[0] == logged(plain, key)[0], key
    assert len(logged(trainer, "step_time")) == 2 and all(t > 0 for t in logged(trainer, "step_time"))
    assert all(s > 0 for s in logged(trainer, "sam/sam_steps"))


# ------------------------------------------------------------------------------------ Momentum-SAM (free preset)
class MomentumSAMByHand(trl.GRPOTrainer):
    """TRL's GRPOTrainer with AdamW whose optimizer steps after the first take the gradient of TRL's loss at
    w + e, e = -rho m / ||m|| (m: AdamW's exp_avg of every parameter, the norm over all of them), computed once per
    optimizer step; the first step is plain (no moment yet)."""

    rho = 0.2

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        prepared = with_sampling_log_probs(self, model, self._prepare_inputs(inputs))  # generation at w, first
        params = [p for p in model.parameters() if p.requires_grad]
        if self._step % self.args.gradient_accumulation_steps == 0:  # the window's first micro-batch
            m = [self.optimizer.state[p]["exp_avg"] for p in params]
            norm = torch.sqrt(sum((mi.double() ** 2).sum() for mi in m)).float()
            self.e = [-self.rho * mi / norm for mi in m]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, self.e):
                p.add_(ei)
        loss = self.compute_loss(model, prepared)
        loss.backward()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        self._step += 1
        return loss.detach()


ADAMW = dict(optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
             max_grad_norm=0.0, warmup_steps=0)


@pytest.mark.parametrize("accumulation", [dict(), dict(gradient_accumulation_steps=2)],
                         ids=["one_micro_batch", "one_e_per_optimizer_step"])
def test_the_free_preset_equals_momentum_sam_by_hand_on_grpos_loss(accumulation, tmp_path):
    """Step 1 is plain; step 2 is Momentum-SAM on the batch generated at w. With two micro-batches per optimizer step
    (one generation split in two), both take their gradient at the same w + e."""
    expected = grpo(MomentumSAMByHand, trl.GRPOConfig, tmp_path, **ADAMW, **accumulation)
    trainer = grpo(GRPOLWSAMTrainer, GRPOLWSAMConfig, tmp_path, **ADAMW, **accumulation, sam_preset="free",
                   sam_rho=MomentumSAMByHand.rho)
    assert logged(trainer, "reward") == logged(expected, "reward")
    assert logged(trainer, "sam/sam_steps") == [0.0, 1.0]
    start = weights(tiny_policy())
    assert rel(weights(trainer.model), weights(expected.model), start) <= 1e-4  # float32 rounding, as above
    plain = grpo(trl.GRPOTrainer, trl.GRPOConfig, tmp_path, **ADAMW, **accumulation)
    assert rel(weights(plain.model), weights(expected.model), start) > 1e-3  # the perturbation changed the update


def test_resuming_a_grpo_run_from_its_checkpoint_is_bit_exact(tmp_path):
    """sam_preset="free" (the moment is in the optimizer's checkpoint): checkpoint-1 resumed gives step 2 to the bit."""
    whole = grpo(GRPOLWSAMTrainer, GRPOLWSAMConfig, tmp_path, **ADAMW, sam_preset="free", save_strategy="steps",
                 save_steps=1)
    args = GRPOLWSAMConfig(output_dir=str(tmp_path / "resumed"), **{**COMMON, **ADAMW}, sam_preset="free")
    resumed = GRPOLWSAMTrainer(model=tiny_policy(), reward_funcs=low_id_tokens, args=args, train_dataset=prompts(),
                               processing_class=smollm2_tokenizer())
    resumed.train(resume_from_checkpoint=str(tmp_path / "GRPOLWSAMTrainer" / "checkpoint-1"))
    a, b = weights(whole.model), weights(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert logged(resumed, "reward") == logged(whole, "reward")  # step 1 from the checkpoint's log history


# ------------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow  # two processes, two trainers each
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is not available")
def test_the_free_preset_under_ddp_equals_momentum_sam_by_hand(tmp_path):
    """2 CPU processes: each generates its own completions (so a run is compared with the formula by hand on the same
    processes, not with one process, whose sampling differs); the ranks stay bit-identical."""
    from pathlib import Path

    from test_distributed import launch_script

    launch_script(Path(__file__).resolve().parent / "trl_grpo_worker.py", [str(tmp_path)], timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["sam_steps"] == [0.0, 1.0]
    assert ranks[0]["rewards"][0] == ranks[0]["rewards"][1]  # the same completions were sampled
    assert all(torch.equal(ranks[0]["ours"][n], ranks[1]["ours"][n]) for n in ranks[0]["ours"])
    assert rel(ranks[0]["ours"], ranks[0]["expected"], weights(tiny_policy())) <= 1e-4
