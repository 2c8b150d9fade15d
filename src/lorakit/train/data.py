"""Training data: JSONL readers, tokenisation with loss masks, packing and batching.

Formats (one JSON object per line):
- ``{"prompt": ..., "completion": ...}``: loss on the completion only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat, loss on assistant turns only;
- ``{"text": ...}``: plain causal LM, loss on every token;
- ``{"text": ..., "label": ...}``: sequence classification; labels are ints (class ids) or strings
  (mapped to ids in sorted order by :func:`label_names`), one kind per file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError

IGNORE = -100  # label value the loss skips
# Tried in order: "text_label" before its subset "text".
FORMATS = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text_label": ("text", "label"),
    "text": ("text",),
}


@dataclass
class Record:
    """One tokenised training sequence; labels are IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    label: int | None = None  # class id of a sequence-classification record (then ``labels`` is unused)


def _format_of(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    for name, keys in FORMATS.items():
        if all(k in row for k in keys):
            return name
    raise ConfigError(
        f"{where}: unknown record with keys {sorted(row)}; "
        "expected {'prompt','completion'}, {'messages'}, {'text','label'} or {'text'}."
    )


def _check_row(row: dict[str, Any], fmt: str, where: str) -> None:
    if fmt == "messages":
        msgs = row["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}.")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ConfigError(f"{where}: the conversation has no assistant turn, so there is nothing to learn.")
        return
    if fmt == "text_label":
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
            raise ConfigError(f"{where}: 'label' must be an integer class id or a non-empty string, got {label!r}.")
        if isinstance(label, int) and label < 0:
            raise ConfigError(f"{where}: 'label' must be a class id >= 0, got {label}.")
    for key in FORMATS[fmt][:1] if fmt == "text_label" else FORMATS[fmt]:
        if not isinstance(row[key], str) or not row[key]:
            raise ConfigError(f"{where}: field {key!r} must be a non-empty string.")


def read_jsonl(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(format, rows) of a JSONL file; every malformed line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist.")
    rows: list[dict[str, Any]] = []
    fmt = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from e
        row_fmt = _format_of(row, where)
        if fmt == "text_label" and row_fmt == "text":
            raise ConfigError(f"{where}: missing 'label'; every line of a classification file needs text and label.")
        if fmt is not None and row_fmt != fmt:
            raise ConfigError(f"{where}: a {row_fmt!r} record in a file of {fmt!r} records; use one format per file.")
        _check_row(row, row_fmt, where)
        if row_fmt == "text_label" and rows and type(row["label"]) is not type(rows[0]["label"]):
            raise ConfigError(
                f"{where}: label {row['label']!r} mixes integer and string labels; use one kind per file."
            )
        fmt = row_fmt
        rows.append(row)
    if fmt is None:
        raise ConfigError(f"data file {path} holds no records.")
    return fmt, rows


def label_names(rows: Sequence[dict[str, Any]]) -> list[int] | list[str]:
    """Class names by id: ``[0, ..., max]`` for integer labels, the sorted distinct strings otherwise."""
    labels = [r["label"] for r in rows]
    if all(isinstance(x, int) for x in labels):
        names: list[int] | list[str] = list(range(max(labels) + 1))
    else:
        names = sorted(set(labels))
    if len(names) < 2:
        raise ConfigError(f"classification data needs at least 2 classes; found only {names!r}.")
    return names


def pad_id(tok: Any) -> int:
    """The tokenizer's pad token id, or its end-of-sequence id when it has no pad token."""
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _chat_ids(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_prompt_completion(tok: Any, prompt: str, completion: str, *, chat: bool) -> Record:
    """Prompt tokens get no loss; the completion and its end-of-sequence token do."""
    if chat:
        return encode_messages(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    p, c = _ids(tok, prompt), _ids(tok, completion) + [tok.eos_token_id]
    return Record(p + c, [IGNORE] * len(p) + c)


def encode_messages(tok: Any, messages: list[dict[str, str]]) -> Record:
    """Render with the tokenizer's chat template; only assistant turns carry loss."""
    if not getattr(tok, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template, so chat data cannot be rendered; use prompt/completion.")
    ids: list[int] = []
    labels: list[int] = []
    for i, msg in enumerate(messages):
        upto = _chat_ids(tok, messages[: i + 1], generation_prompt=False)
        if msg["role"] == "assistant":
            prefix = _chat_ids(tok, messages[:i], generation_prompt=True)
            if upto[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
                raise ConfigError("the chat template does not render conversations prefix by prefix; cannot mask.")
            labels += [IGNORE] * (len(prefix) - len(ids)) + upto[len(prefix) :]
        else:
            labels += [IGNORE] * (len(upto) - len(ids))
        ids = upto
    return Record(ids, labels)


def encode_labelled(tok: Any, rows: Sequence[dict[str, Any]], names: Sequence[int | str], max_len: int) -> list[Record]:
    """Classification records: the tokenizer's full encoding (with [CLS]/[SEP] where it adds them), class id."""
    ids_of = {name: i for i, name in enumerate(names)}
    out = []
    for row in rows:
        ids = list(tok(row["text"], truncation=True, max_length=max_len)["input_ids"])
        out.append(Record(ids, [IGNORE] * len(ids), label=ids_of[row["label"]]))
    return out


def encode_rows(tok: Any, fmt: str, rows: Sequence[dict[str, Any]], *, chat: bool, max_len: int) -> list[Record]:
    """Tokenise rows of one format; sequences are cut to ``max_len`` tokens."""
    if fmt == "text_label":
        return encode_labelled(tok, rows, label_names(rows), max_len)
    out = []
    for row in rows:
        if fmt == "prompt_completion":
            rec = encode_prompt_completion(tok, row["prompt"], row["completion"], chat=chat)
        elif fmt == "messages":
            rec = encode_messages(tok, row["messages"])
        else:
            ids = _ids(tok, row["text"]) + [tok.eos_token_id]
            rec = Record(ids, list(ids))
        out.append(Record(rec.input_ids[:max_len], rec.labels[:max_len]))
    return out


def pack(records: Sequence[Record], max_len: int) -> list[Record]:
    """Concatenate records into sequences of at most ``max_len`` tokens (fewer pad tokens)."""
    packed: list[Record] = []
    cur = Record([], [])
    for rec in records:
        if cur.input_ids and len(cur.input_ids) + len(rec.input_ids) > max_len:
            packed.append(cur)
            cur = Record([], [])
        cur = Record(cur.input_ids + rec.input_ids, cur.labels + rec.labels)
    if cur.input_ids:
        packed.append(cur)
    return packed


def collate(records: Sequence[Record], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest record: input_ids, attention_mask and labels, each (B, T).

    Classification records (``label`` set) give labels of shape (B,): one class id per sequence.
    """
    T = max(len(r.input_ids) for r in records)
    ids = torch.full((len(records), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(records), T), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(records), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(records):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    if all(r.label is not None for r in records):
        labels = torch.tensor([r.label for r in records], dtype=torch.long)  # (B,)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
