"""The accuracy study's tasks (`benchmark_accuracy.py`): their budgets, data splits and models, all offline.

  cls-full, cls-lora        the shipped MiniLM on the shipped tweets (`tweet_splits`, `cls_model`)
  lm                        a small GPT-2 pretrained on most Shakespeare plays, fine-tuned on others (`lm_assets`)
  chat, chat-small, ...     the shipped SmolLM2-135M-Instruct on tweet sentiment as chats (`chat_splits`)
  tweets-*, digits[-*]      the robustness suite: label noise, small data, a tiny ViT on scikit-learn's digits
                            (`robust_data`, `tiny_vit`, `with_label_noise`)

`Budget` and `RobustBudget` size them (`QUICK`, `QUICK_ROBUST`: the smoke-run sizes); `run_config` is what a cached
run depends on. `TASKS` is the tasks table the runner reads: one `Task` row each (its suite, data loader, `Recipe`
for one run: model, splits, TrainingArguments and scoring; metric, protocol, learning-rate grid, where its costs come
from). Adding a task is one row, its loader and recipe, and its `run_config` entry. Every asset is local: the offline
defaults (`HF_HUB_OFFLINE=1`, ...) are its users' to set, as `benchmark_accuracy.py` does before importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_lwsam.data import (
    load_tweets,
    minilm_path,
    shakespeare_files,
    train_byte_bpe,
    tweet_sentiment_chats,
)

LM_FINETUNE_PLAYS = ("twelfth-night", "as-you-like-it", "much-ado-about-nothing", "the-merchant-of-venice")
LM_TEST_PLAY = "a-midsummer-night-s-dream"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])  # + the classifier head, trained
CHAT_TASKS = ("chat", "chat-small", "chat-noise40", "chat-noise40-full")  # `-full`: every weight, no LoRA
CHAT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
# The plain optimizer's learning rate (and weight decay) of the SmolLM2 study's tasks, chosen on validation (seed 0)
# from these grids; the other chat tasks keep the fixed `LEARNING_RATE`.
CHAT_LR_GRID = {"chat-noise40": (1e-3, 2e-3, 4e-3), "chat-noise40-full": (1e-5, 3e-5, 1e-4)}
CHAT_WD_GRID = (0.0, 0.1)
CHAT_EVAL_BATCH = 32  # prompts per scoring forward
# Every method trains with the AdamW baseline's learning rate. cls: the best validation accuracy (seed 0) of
# {5e-5, 1e-4, 2e-4, 4e-4} (full) and {5e-4, 2e-3, 4e-3, 8e-3, 1.5e-2} (LoRA). lm: fixed, not tuned (1e-3 gives a
# lower validation perplexity but a higher test perplexity: it over-fits the fine-tuning plays).
LEARNING_RATE = {"cls-full": 4e-4, "cls-lora": 8e-3, "lm": 3e-4}
# The SmolLM2 chat tasks: `hf-lwsam-sft`'s offline default recipe (LoRA r=16 on every linear layer, learning rate
# 2e-3; not tuned here).
# The full-parameter task's fixed rate (when not swept): the middle of its grid.
LEARNING_RATE.update({task: 2e-3 for task in CHAT_TASKS if not task.endswith("full")}, **{"chat-noise40-full": 3e-5})


@dataclass
class Budget:
    """The main suite's sizes: the cls, lm and chat tasks' data, steps and epochs."""

    cls_train: int = 2000
    cls_eval: int = 1000
    cls_epochs: float = 1.0
    cls_max_length: int = 64
    lm_pretrain_steps: int = 300
    lm_finetune_steps: int = 80
    lm_block: int = 128
    lm_vocab: int = 4096
    lm_eval_blocks: int = 256
    # chat tasks (SmolLM2, ~63 tokens a chat), sized from `scripts/chat_learning_curve.py` on chat-noise40 (AdamW,
    # seed 0, bf16, padding-free; benchmarks/accuracy/chat_learning_curve_adamw_bf16_padding_free_{128,256,512}.json):
    # final validation answer accuracy 0.608 after 128 steps of 8, 0.684 after 256, 0.632 after 512. Doubling 256 to
    # 512 bought no accuracy (answer NLL 0.967 -> 0.913, forgetting 5.10 -> 5.98 nats): 256 steps.
    chat_train: int = 2048  # chat, chat-noise40: 1 epoch, 256 steps of 8
    chat_small: int = 128  # chat-small: 4 epochs over 128 chats, 64 steps
    chat_small_epochs: int = 4
    chat_val: int = 500  # validation tweets (the learning rate's and rho's choice)
    chat_test: int = 1000  # test tweets
    # CPU bf16 autocast for training and scoring, and TRL's padding-free batches (one packed row per batch, the same
    # loss as padded on the same chats): 0.57x float32-padded's LoRA step time, bf16 0.46x its scoring time (one
    # thread, idle, 3 rounds: benchmarks/accuracy/chat_sizing_cost.json)
    chat_bf16: bool = True
    chat_padding_free: bool = True
    # forgetting: the NLL of a held-out Shakespeare play (`LM_TEST_PLAY`), before and after fine-tuning
    forget_blocks: int = 32
    forget_block: int = 128


QUICK = Budget(cls_train=192, cls_eval=128, cls_max_length=48, lm_pretrain_steps=30, lm_finetune_steps=12,
               lm_block=64, lm_vocab=1024, lm_eval_blocks=64, chat_train=16, chat_small=8, chat_val=16,
               chat_test=16, forget_blocks=2, forget_block=32)


# The robustness suite (`--suite robustness`): where the literature reports SAM's largest gains.
ROBUST_TASKS = ("tweets-noise20", "tweets-noise40", "tweets-small", "digits", "digits-noise20", "digits-noise40")


@dataclass
class RobustBudget:
    """The robustness suite's sizes: the tweets and digits splits and epochs."""

    tweets_train: int = 500  # tweets-noise*: 500 training tweets, 4 epochs
    tweets_small: int = 250  # tweets-small: 250 clean training tweets, 8 epochs
    tweets_val: int = 500
    tweets_test: int = 1000
    tweets_epochs: int = 4
    small_epochs: int = 8
    max_length: int = 64
    digits_val: int = 300  # of scikit-learn's 1797 digits: 500 test, 300 validation, the other 997 train
    digits_test: int = 500
    digits_epochs: int = 30


QUICK_ROBUST = RobustBudget(tweets_train=96, tweets_small=64, tweets_val=64, tweets_test=64, tweets_epochs=2,
                            small_epochs=2, max_length=48, digits_epochs=3)
# AdamW's learning rate per robustness task: the best final validation accuracy (seed 0) of the grid, every method
# then trains with it (`benchmark_accuracy.py`'s `run_robustness`).
ROBUST_LR_GRID = {"tweets": [1e-4, 4e-4], "digits": [1e-3, 3e-3]}


def noise_fraction(task: str) -> float:
    """The share of noisy training labels a task's name asks for (`digits-noise40`, `chat-noise40-full`: 0.4)."""
    import re

    found = re.search(r"noise(\d+)", task)
    return int(found.group(1)) / 100 if found else 0.0


def with_label_noise(data: Dataset, fraction: float, num_classes: int, seed: int = 0) -> Dataset:
    """Symmetric label noise: `round(fraction * n)` examples, drawn at random, get a label drawn uniformly from the
    *other* classes. The same examples and labels for every method and seed (`seed` fixes the draw)."""
    if fraction == 0:
        return data
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.array(data["label"])
    flipped = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, num_classes, size=len(flipped))) % num_classes
    return data.remove_columns("label").add_column("label", labels.tolist())


def tweet_splits(budget: Budget) -> tuple[DatasetDict, Any]:
    """The cls tasks' tweets, tokenized for MiniLM (train / validation / test), and the tokenizer."""
    tweets = load_tweets(seed=42, validation_size=budget.cls_eval, test_size=budget.cls_eval,
                         max_train_samples=budget.cls_train)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tweets.map(lambda b: tokenizer(b["text"], truncation=True, max_length=budget.cls_max_length),
                      batched=True, remove_columns=["text"]), tokenizer


def chat_splits(task: str, budget: Budget) -> DatasetDict:
    """The chat task's tweets as SmolLM2 chats (label noise in the training split only), with their `label`."""
    tweets = load_tweets(seed=42, validation_size=budget.chat_val, test_size=budget.chat_test,
                         max_train_samples=budget.chat_small if task == "chat-small" else budget.chat_train)
    tweets["train"] = with_label_noise(tweets["train"], noise_fraction(task), 3)
    return DatasetDict({split: tweet_sentiment_chats(data) for split, data in tweets.items()})


def cls_model(lora: bool, seed: int):
    """The shipped MiniLM with a new 3-class head (initialised from `seed`), under LoRA (`LORA`) if `lora`."""
    set_seed(seed)  # the classifier head's initialisation depends on the seed
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **LORA))
    return model


def _read(play: str) -> str:
    with open(shakespeare_files()[play][0], encoding="utf-8") as f:
        return f.read()


def _blocks(tokenizer, texts: list[str], size: int) -> Dataset:
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(ids) // size
    return Dataset.from_dict({"input_ids": [ids[i * size : (i + 1) * size] for i in range(n)]})


def lm_assets(budget: Budget, cache: Path, log) -> tuple[str, DatasetDict]:
    """The pretrained small GPT-2 checkpoint (trained once and cached) and the fine-tune/validation/test blocks."""
    held_out = set(LM_FINETUNE_PLAYS) | {LM_TEST_PLAY}
    pretrain_plays = [p for p in shakespeare_files() if p not in held_out]
    ckpt = cache / f"gpt2-shakespeare-v{budget.lm_vocab}-s{budget.lm_pretrain_steps}-b{budget.lm_block}"
    if (ckpt / "config.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    else:
        log(f"pretraining a small GPT-2 on {len(pretrain_plays)} plays ({budget.lm_pretrain_steps} steps) -> {ckpt}")
        tokenizer = train_byte_bpe([_read(p) for p in pretrain_plays], budget.lm_vocab)
        corpus = _blocks(tokenizer, [_read(p) for p in pretrain_plays], budget.lm_block)
        set_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=budget.lm_block, n_embd=128, n_layer=4,
                            n_head=4, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
        args = TrainingArguments(output_dir=str(cache / "pretrain"), per_device_train_batch_size=32,
                                 max_steps=budget.lm_pretrain_steps, learning_rate=1e-3, warmup_steps=20,
                                 lr_scheduler_type="cosine", report_to="none", save_strategy="no", use_cpu=True,
                                 logging_steps=50, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=corpus,
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
    tune = _blocks(tokenizer, [_read(p) for p in LM_FINETUNE_PLAYS], budget.lm_block).shuffle(seed=0)
    n_val = min(max(len(tune) // 10, 8), budget.lm_eval_blocks)
    test = _blocks(tokenizer, [_read(LM_TEST_PLAY)], budget.lm_block)
    splits = DatasetDict(train=tune.select(range(n_val, len(tune))), validation=tune.select(range(n_val)),
                         test=test.select(range(min(len(test), budget.lm_eval_blocks))))
    return str(ckpt), splits


def robust_data(task: str, rb: RobustBudget) -> tuple[DatasetDict, Any]:
    """The robustness task's splits (noise in the training split only) and its collator."""
    if task.startswith("digits"):
        from sklearn.datasets import load_digits  # real 8x8 handwritten digits shipped inside scikit-learn

        digits = load_digits()
        images = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0).tolist()
        full = Dataset.from_dict({"pixel_values": images, "label": digits.target.tolist()}).shuffle(seed=42)
        n_test, n_val = rb.digits_test, rb.digits_val
        splits = DatasetDict(test=full.select(range(n_test)), validation=full.select(range(n_test, n_test + n_val)),
                             train=full.select(range(n_test + n_val, len(full))))
        splits["train"] = with_label_noise(splits["train"], noise_fraction(task), 10)
        splits = splits.with_format("torch")
        return splits, None
    n_train = rb.tweets_small if task == "tweets-small" else rb.tweets_train
    tweets = load_tweets(seed=42, validation_size=rb.tweets_val, test_size=rb.tweets_test, max_train_samples=n_train)
    tweets["train"] = with_label_noise(tweets["train"], noise_fraction(task), 3)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokens = tweets.map(lambda b: tokenizer(b["text"], truncation=True, max_length=rb.max_length), batched=True,
                        remove_columns=["text"])
    return tokens, DataCollatorWithPadding(tokenizer)


def tiny_vit(seed: int):
    """A ViT trained from scratch on the 8x8 digits: 2x2 patches, 4 blocks of width 64 (~0.2M parameters)."""
    from transformers import ViTConfig, ViTForImageClassification

    set_seed(seed)
    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def run_config(task: str, budget: Budget | RobustBudget, lr: float | None = None, wd: float = 0.0) -> dict:
    """Everything a cached run depends on besides method, rho and seed: a cached run made otherwise is redone.
    `lr`: the chosen (or swept) learning rate where the task sweeps it; `wd`: the weight decay, recorded when not 0."""
    if task in ROBUST_TASKS:
        if task.startswith("digits"):
            hp = dict(model="tiny ViT 4x64", batch=32, epochs=budget.digits_epochs, val=budget.digits_val,
                      test=budget.digits_test)
        else:
            small = task == "tweets-small"
            hp = dict(model="all-MiniLM-L6-v2", batch=32, train=budget.tweets_small if small else budget.tweets_train,
                      epochs=budget.small_epochs if small else budget.tweets_epochs, val=budget.tweets_val,
                      test=budget.tweets_test, max_length=budget.max_length)
        hp.update(lr=lr, warmup_ratio=0.06, noise=noise_fraction(task), noise_kind="symmetric, other classes")
    elif task.startswith("cls"):
        hp = dict(batch=32, epochs=budget.cls_epochs, lr=LEARNING_RATE[task], warmup_ratio=0.06,
                  train=budget.cls_train, eval=budget.cls_eval, max_length=budget.cls_max_length)
        if task == "cls-lora":
            hp.update(lora=LORA)
    elif task in CHAT_TASKS:
        small = task == "chat-small"
        hp = dict(model="SmolLM2-135M-Instruct", batch=8, epochs=budget.chat_small_epochs if small else 1,
                  train=budget.chat_small if small else budget.chat_train, val=budget.chat_val, eval=budget.chat_test,
                  lr=LEARNING_RATE[task] if lr is None else lr, warmup_steps=2,
                  max_length=None if budget.chat_padding_free else 128,  # padding-free: no chat is truncated
                  lora=None if task.endswith("full") else CHAT_LORA, noise=noise_fraction(task),
                  noise_kind="symmetric, other classes", bf16=budget.chat_bf16, padding_free=budget.chat_padding_free,
                  scoring="answer accuracy and answer_nll: the labels' first tokens after the generation prompt",
                  forgetting=dict(text=LM_TEST_PLAY, blocks=budget.forget_blocks, block=budget.forget_block))
    else:
        hp = dict(batch=16, steps=budget.lm_finetune_steps, lr=LEARNING_RATE[task], warmup_steps=5,
                  block=budget.lm_block, vocab=budget.lm_vocab, pretrain_steps=budget.lm_pretrain_steps,
                  eval_blocks=budget.lm_eval_blocks)
    if wd:
        hp["weight_decay"] = wd
    return dict(task=task, **hp)


# ------------------------------------------------------------------------------------------------- the tasks table
@dataclass
class Recipe:
    """What one training run of a task is made of (`Task.recipe(task, hp, data, seed)`): the model, the splits, the
    task's own `TrainingArguments` and trainer arguments, and how a split is scored."""

    model: Any
    splits: DatasetDict  # train / validation / test
    args: dict[str, Any]  # epochs or steps, warm-up, evaluation batch, ...: on top of the runner's shared arguments
    evaluate: Callable[[Trainer, str], dict[str, float]]  # (the trained trainer, a split's name) -> its metrics
    tokens: Callable[[Trainer], int] | None  # tokens trained on (for tokens/s); None: not recorded
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # data_collator, compute_metrics, peft_config, ...
    after: Callable[[Trainer], dict[str, Any]] | None = None  # more of the run's record after training (forgetting)
    sft: bool = False  # TRL's SFTTrainer (SFTLWSAMTrainer with SAM) instead of the Trainer (LWSAMTrainer)
    train: Dataset | None = None  # the training split as the trainer takes it (default: `splits["train"]`)

    @property
    def train_dataset(self) -> Dataset:
        """The dataset the trainer trains on: `train`, or `splits["train"]` when the recipe gives none of its own."""
        return self.train if self.train is not None else self.splits["train"]


@dataclass(frozen=True)
class Task:
    """One row of the tasks table (`TASKS`).

    Args:
        name: its name on the command line and in cache keys.
        suite: the suite that runs it by default, whose methods table it trains (`main`, `chat`, `robustness`).
        family: the model family (`tweets`, `lm`, `chat`, `digits`: the robustness methods' layer patterns key on it).
        data: the key its data is loaded under: tasks with the same key share one load (`cls-full`, `cls-lora`).
        load: `(task, budget, cache_dir, log) -> data`, called once per `data` key, when a run needs training.
        recipe: `(task, hp, data, seed) -> Recipe` for one run (`hp`: `run_config`'s configuration).
        metric: `accuracy` or `perplexity` (lower is better).
        epochs: the robustness protocol: several epochs validated every epoch, tested at the end and at the best
            validation epoch; else trained once, tested at the end (and validated on seed 0 for a rho sweep).
        lr_grid: AdamW's learning rate is chosen on validation (seed 0) from it, then every method trains with it;
            `None`: the fixed learning rate of `run_config`.
        wd_grid: the weight decays AdamW's learning rate is chosen with (each pair on validation, seed 0).
        method_in_config: each run's configuration holds the method's `sam_*` options, so a changed row is redone
            (off for the first tasks, whose cached runs were made without them).
        cost_files: `benchmark_throughput.py` JSON files (under `benchmarks/throughput/`, `{device}` filled in) whose
            ratios stand for the methods' costs, through `cost_proxy` (method -> benchmark method).
        measurable: `--measure_cost` times the methods on the task itself (its ratios win over `cost_files`').
        save_steps: a checkpoint every this share of the run (TrainingArguments' `save_steps` as a ratio), so a run
            stopped part-way resumes from its last one (`None`: runs start over; the short tasks, and every task
            with `epochs`, whose best epoch's weights are kept in memory).
    """

    name: str
    suite: str
    family: str
    data: str
    load: Callable[..., Any]
    recipe: Callable[..., Recipe]
    metric: str = "accuracy"
    epochs: bool = False
    lr_grid: tuple[float, ...] | None = None
    wd_grid: tuple[float, ...] = (0.0,)
    method_in_config: bool = True
    cost_files: tuple[str, ...] = ()
    cost_proxy: dict[str, str] = field(default_factory=dict)
    measurable: bool = True
    save_steps: float | None = None

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "perplexity"

    def budget(self, quick: bool = False) -> Budget | RobustBudget:
        """What sizes it: `RobustBudget` for the robustness protocol, else `Budget` (`quick`: the smoke sizes)."""
        if self.epochs:
            return QUICK_ROBUST if quick else RobustBudget()
        return QUICK if quick else Budget()


def _classification(splits: DatasetDict) -> Callable[[Trainer, str], dict[str, float]]:
    def evaluate(trainer: Trainer, split: str) -> dict[str, float]:
        metrics = trainer.evaluate(splits[split])
        return dict(accuracy=metrics["eval_accuracy"], f1=metrics["eval_f1"])
    return evaluate


def _cls_recipe(task: Task, hp: dict, data: tuple[DatasetDict, Any], seed: int) -> Recipe:
    from hf_lwsam.cli.metrics import classification_metrics

    tweets, tokenizer = data
    model = cls_model(lora=task.name == "cls-lora", seed=seed)
    return Recipe(model, tweets, dict(per_device_eval_batch_size=128, num_train_epochs=hp["epochs"],
                                      warmup_steps=hp["warmup_ratio"]),  # a float in [0, 1): a ratio of the steps
                  _classification(tweets),
                  lambda trainer: sum(len(ids) for ids in tweets["train"]["input_ids"]) * hp["epochs"],
                  dict(data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=classification_metrics()[0]))


def _lm_recipe(task: Task, hp: dict, data: tuple[str, DatasetDict], seed: int) -> Recipe:
    import math

    ckpt, blocks = data
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    set_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    model.loss_type = "ForCausalLM"
    return Recipe(model, blocks, dict(per_device_eval_batch_size=32, max_steps=hp["steps"],
                                      warmup_steps=hp["warmup_steps"]),
                  lambda trainer, split: dict(perplexity=math.exp(trainer.evaluate(blocks[split])["eval_loss"])),
                  lambda trainer: hp["steps"] * hp["batch"] * hp["block"],
                  dict(data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)))


def answer_scores(model, tokenizer, chats: Dataset, batch_size: int = 32) -> dict[str, float]:
    """`accuracy`: the share of `chats` whose most likely answer among the labels is theirs; `answer_nll`: the mean
    negative log-likelihood of the right answer's first token (normalised over the whole vocabulary) right after
    the generation prompt. One forward per chat (`hf_lwsam.cli.sft_offline.answer_log_probs`)."""
    from hf_lwsam.cli.sft_offline import answer_log_probs

    # scored in order of length: a batch pads to its longest prompt (both scores are means, so the order is free)
    order = sorted(range(len(chats)), key=lambda i: sum(len(m["content"]) for m in chats[i]["prompt"]))
    chats = chats.select(order)
    log_probs = answer_log_probs(model, tokenizer, chats, batch_size)
    labels = torch.tensor(chats["label"])
    return dict(accuracy=(log_probs.argmax(-1) == labels).float().mean().item(),
                answer_nll=-log_probs.gather(1, labels[:, None]).mean().item())


def text_blocks(tokenizer, blocks: int, block: int) -> torch.Tensor:
    """The forgetting text: the first `blocks` x `block` tokens of the held-out play `LM_TEST_PLAY` (no chat
    template), as a `(blocks, block)` tensor of token ids."""
    ids = tokenizer(_read(LM_TEST_PLAY), add_special_tokens=False)["input_ids"]
    if len(ids) < blocks * block:
        raise ValueError(f"forget_blocks x forget_block = {blocks * block} tokens, but {LM_TEST_PLAY} has "
                         f"{len(ids)}: ask for fewer")
    return torch.tensor(ids[: blocks * block]).view(blocks, block)


@torch.no_grad()
def text_nll(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """The mean next-token negative log-likelihood of `blocks` (equal-length rows: the mean of the blocks' means is
    the mean over tokens) under `model`, in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.float().item() * len(b)
                  for b in blocks.split(batch_size)]
    finally:
        model.train(was_training)
    return sum(losses) / len(blocks)


# The chat runs (15-60 min on one CPU core) keep a checkpoint every 1/8 of the run (32 steps of 256): a run stopped
# part-way loses at most that much when it resumes. Resuming gives the run an uninterrupted one would have made
# (the Trainer restores weights, optimizer, scheduler, RNG and data order; hf_lwsam its ascent's state).
CHAT_SAVE_STEPS = 0.125

_NLL_BEFORE: dict[tuple, float] = {}  # the pretrained model's forgetting NLL, once per configuration


def _chat_recipe(task: Task, hp: dict, chats: DatasetDict, seed: int) -> Recipe:
    """An SFT of SmolLM2 (TRL's `SFTTrainer`; LoRA unless the task is `-full`), scored by the answer accuracy and
    the answer NLL (`answer_scores`), with the NLL of a held-out play before and after (`forgetting`)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from hf_lwsam.data import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    set_seed(seed)  # the LoRA initialisation depends on the seed
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    blocks = text_blocks(tokenizer, hp["forgetting"]["blocks"], hp["forgetting"]["block"])
    key = (hp["forgetting"]["blocks"], hp["forgetting"]["block"], hp["bf16"])
    if key not in _NLL_BEFORE:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp["bf16"]):
            _NLL_BEFORE[key] = text_nll(model, blocks)
    device_of = lambda trainer: trainer.args.device.type  # noqa: E731

    def evaluate(trainer: Trainer, split: str) -> dict[str, float]:
        with torch.autocast(device_of(trainer), dtype=torch.bfloat16, enabled=hp["bf16"]):
            return answer_scores(trainer.model, tokenizer, chats[split], CHAT_EVAL_BATCH)

    def after(trainer: Trainer) -> dict[str, Any]:
        with torch.autocast(device_of(trainer), dtype=torch.bfloat16, enabled=hp["bf16"]):
            return dict(forgetting=dict(nll_before=_NLL_BEFORE[key], nll_after=text_nll(trainer.model, blocks)))

    kwargs = dict(processing_class=tokenizer)
    if hp["lora"] is not None:
        kwargs["peft_config"] = LoraConfig(**hp["lora"])
    # padding-free: `max_length` None (TRL refuses one it would not enforce), so no chat is cut
    return Recipe(model, chats, dict(bf16=hp["bf16"], padding_free=hp["padding_free"],
                                     num_train_epochs=hp["epochs"], warmup_steps=hp["warmup_steps"],
                                     max_length=hp["max_length"],
                                     activation_checkpointing=False),
                  evaluate, lambda trainer: sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * hp["epochs"],
                  kwargs, sft=True, train=chats["train"].remove_columns("label"), after=after)


def _robust_recipe(task: Task, hp: dict, data: tuple[DatasetDict, Any], seed: int) -> Recipe:
    from hf_lwsam.cli.metrics import classification_metrics

    splits, collator = data
    model = tiny_vit(seed) if task.family == "digits" else cls_model(lora=False, seed=seed)
    return Recipe(model, splits, dict(per_device_eval_batch_size=128, num_train_epochs=hp["epochs"],
                                      warmup_steps=hp["warmup_ratio"]),
                  _classification(splits), None,
                  dict(data_collator=collator, compute_metrics=classification_metrics()[0]))


# The costs that stand for the methods' own (`Task.cost_files`): `benchmark_throughput.py`'s ratios of the same mode
# and selection rule. The chat tasks: `--preset smollm2-135m --lora` (LoRA r=16 on every linear layer; SmolLM2's
# default selection is block 29 + the final norm, the preset's k=1 with reuse; the probe is not measured).
SMOLLM2_LORA_FILES = ("throughput_smollm2_lora_{device}.json", "momentum_smollm2_lora_{device}.json")
CHAT_COST_PROXY = {"full SAM": "full SAM", "LW-SAM default": "LW-SAM k=1 reuse",
                   "fast preset": "full SAM late from 80%", "free preset": "full momentum"}
# The digits and tweets tasks: the benchmark's CPU shape (GPT-2, 6 layers, d=256, T=128): the cheaper roads' run,
# then the late-phase runs: full SAM's modes side by side with the shorter late phases (3 rounds x 20 steps), then
# the last 10% / 5% alone with AdamW, longer (5 rounds x 40 steps: one SAM step in 20 needs more steps to be timed
# well), then full SAM and its last 20% / 10% the same way (a later file's figure replaces an earlier one's). The
# tiny ViT's own step time is Python-bound and says nothing about a real model's.
SHAPE_FILES = tuple(f"{name}_{{device}}.json" for name in ("cheaper_roads", "late_phase", "late_phase_long",
                                                             "late_phase_final", "momentum"))
SHAPE_COST_PROXY = {"full SAM": "full SAM", "LW-SAM default": "LW-SAM k=1 reuse", "LW-SAM stale": "LW-SAM k=1 stale",
                    "LW-SAM interval=4": "LW-SAM k=1 reuse interval=4", "SAM on norms": "norms",
                    "norms stale": "norms stale", "norms late 70%": "norms late from 70%",
                    "full LookSAM k=5": "full SAM LookSAM interval=5", "full random": "full random",
                    **{f"full SAM late {p}%": f"full SAM late from {p}%" for p in (70, 80, 90, 95)},
                    # one pass: the momentum rows; a late phase costs at most the full run's ratio, and a learning-rate
                    # schedule nothing
                    "full momentum": "full momentum", "LW-SAM momentum": "LW-SAM k=1 momentum",
                    "full momentum late 80%": "full momentum", "full momentum late 80% WSD": "full momentum",
                    "adamw WSD": "adamw", "full SAM late 80% WSD": "full SAM late from 80%"}


def _tweets(task: Task, budget: Budget, cache: Path, log) -> tuple[DatasetDict, Any]:
    return tweet_splits(budget)


def _lm(task: Task, budget: Budget, cache: Path, log) -> tuple[str, DatasetDict]:
    return lm_assets(budget, cache, log)


def _chats(task: Task, budget: Budget, cache: Path, log) -> DatasetDict:
    return chat_splits(task.name, budget)


def _robust(task: Task, budget: RobustBudget, cache: Path, log) -> tuple[DatasetDict, Any]:
    return robust_data(task.name, budget)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cls-full", "main", "tweets", "tweets", _tweets, _cls_recipe, method_in_config=False),
    Task("cls-lora", "main", "tweets", "tweets", _tweets, _cls_recipe, method_in_config=False),
    Task("lm", "main", "lm", "lm", _lm, _lm_recipe, metric="perplexity", method_in_config=False),
    *[Task(name, "chat", "chat", name, _chats, _chat_recipe, lr_grid=CHAT_LR_GRID.get(name),
           wd_grid=CHAT_WD_GRID if name in CHAT_LR_GRID else (0.0,),
           cost_files=() if name.endswith("full") else SMOLLM2_LORA_FILES, cost_proxy=CHAT_COST_PROXY,
           save_steps=CHAT_SAVE_STEPS)
      for name in CHAT_TASKS],
    *[Task(name, "robustness", name.split("-")[0], name, _robust, _robust_recipe, epochs=True,
           lr_grid=tuple(ROBUST_LR_GRID[name.split("-")[0]]), cost_files=SHAPE_FILES, cost_proxy=SHAPE_COST_PROXY,
           measurable=not name.startswith("digits")) for name in ROBUST_TASKS],
]}
