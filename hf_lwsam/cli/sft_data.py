"""Data for `hf-lwsam-sft`: which of the formats TRL's `SFTTrainer` accepts a split is in, checked before any weights
are loaded, with a message naming the columns found, the columns expected and, for near misses (ShareGPT
`from`/`value` messages, roles such as `human`/`bot`), the format to convert to."""

from __future__ import annotations

from typing import Any

from .args import UsageError

ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know
FORMATS = ("a text column ('text', or the one --dataset_text_field names), a conversational 'messages' column (lists "
           "of {'role', 'content'} messages), 'prompt' and 'completion' columns, or tokenized 'input_ids'")
CONVERSATIONAL = ("the conversational format: a 'messages' column of [{'role': 'user', 'content': ...}, {'role': "
                  "'assistant', 'content': ...}] lists, roles one of " + "/".join(ROLES))
RENAMES = "e.g. human -> user, gpt/bot -> assistant, from -> role, value -> content"


def _message_keys(feature: Any) -> set[str] | None:
    """The keys of the messages in a column of message lists, or `None` for any other column."""
    inner = getattr(feature, "feature", None)  # datasets' List / Sequence of a struct
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return set(inner) if isinstance(inner, dict) else None


def _values_of(split: Any, column: str, key: str) -> set[Any]:
    """Every distinct `message[key]` in a column of message lists (read through Arrow, not row by row)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(split.data.column(column))
    return set(pc.unique(pc.struct_field(flat, key)).to_pylist()) - {None}


def _check_messages(split: Any, name: str, column: str) -> None:
    """`column` holds lists of `{'role', 'content'}` messages with known roles."""
    keys = _message_keys(split.features[column])
    where = f"the {name} split's {column!r} column"
    if keys is None:
        raise UsageError(f"{where} holds {split.features[column]!r}, not lists of messages: convert it to "
                         f"{CONVERSATIONAL}.")
    if {"from", "value"} <= keys:
        raise UsageError(f"{where} holds ShareGPT-style {{'from', 'value'}} messages: convert them to "
                         f"{CONVERSATIONAL} ({RENAMES}).")
    if not {"role", "content"} <= keys:
        raise UsageError(f"{where} holds messages with the keys {sorted(keys)}, not 'role' and 'content': convert them "
                         f"to {CONVERSATIONAL}.")
    unknown = sorted(map(str, _values_of(split, column, "role") - set(ROLES)))
    if unknown:
        raise UsageError(f"{where} has messages with the unknown role(s) {unknown}: convert them to {CONVERSATIONAL} "
                         f"({RENAMES}).")


def _is_text(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("string", "large_string")


def sft_format(split: Any, name: str, text_field: str) -> str:
    """The format of one split, as `SFTTrainer` will read it: `'tokenized'`, `'prompt_completion'`,
    `'conversational_prompt_completion'`, `'conversational'` or `'text'`. Raises `UsageError` when it is none of
    them, naming the columns found and the columns expected."""
    columns = split.column_names
    found = f"the {name} split has the columns {columns}"
    if "input_ids" in columns:
        return "tokenized"
    if "prompt" in columns or "completion" in columns:
        if not {"prompt", "completion"} <= set(columns):
            have, lack = ("prompt", "completion") if "prompt" in columns else ("completion", "prompt")
            raise UsageError(f"{found}: a {have!r} column needs a {lack!r} column beside it (the prompt/completion "
                             f"format); add it, or use one of the other formats: {FORMATS}.")
        kinds = {c: "text" if _is_text(split.features[c]) else "messages" for c in ("prompt", "completion")}
        if set(kinds.values()) == {"text"}:
            return "prompt_completion"
        if set(kinds.values()) != {"messages"}:
            raise UsageError(f"the {name} split's 'prompt' and 'completion' columns are one text and one list of "
                             "messages: pass both as text, or both as lists of {'role', 'content'} messages.")
        for column in ("prompt", "completion"):
            _check_messages(split, name, column)
        return "conversational_prompt_completion"
    if "messages" in columns:
        _check_messages(split, name, "messages")
        return "conversational"
    if "conversations" in columns:  # ShareGPT: TRL renames from/value to role/content but keeps the roles' names
        keys = _message_keys(split.features["conversations"]) or set()
        if {"from", "value"} <= keys:
            unknown = sorted(map(str, _values_of(split, "conversations", "from") - set(ROLES)))
            if not unknown:
                return "conversational"
            raise UsageError(f"the {name} split's 'conversations' column is ShareGPT-style with the role(s) "
                             f"{unknown}: convert it to {CONVERSATIONAL} ({RENAMES}).")
        raise UsageError(f"{found}: rename 'conversations' to 'messages' ({CONVERSATIONAL}).")
    if text_field in columns:
        if not _is_text(split.features[text_field]):
            raise UsageError(f"the {name} split's {text_field!r} column holds {split.features[text_field]!r}, not "
                             "text: pass --dataset_text_field with a text column, or data in one of the formats "
                             f"TRL accepts: {FORMATS}.")
        return "text"
    flag = f"--dataset_text_field {text_field!r} is not one of its columns" if text_field != "text" else \
        "it has none of the columns TRL reads"
    raise UsageError(f"{found} and {flag}: pass --dataset_text_field with a text column, or data with {FORMATS}.")


def shortest_example_tokens(split: Any, tokenizer: Any, text_field: str) -> int:
    """The fewest tokens of any row of `split` as `SFTTrainer` tokenizes it (through the chat template for
    conversational rows): the `--max_length` that keeps all of that row."""

    def count(row: dict) -> dict:
        sequence = row["prompt"] + row["completion"] if "prompt" in row else row.get("messages", row.get(text_field))
        if isinstance(sequence, list):
            ids = tokenizer.apply_chat_template(sequence, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(sequence)["input_ids"]
        return {"tokens": len(ids)}

    return min(split.map(count, remove_columns=split.column_names)["tokens"])
