"""Evaluation: mean loss / perplexity on records, exact-match accuracy by greedy generation,
classification accuracy (argmax of the logits) on labelled records."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.train.data import IGNORE, Record, collate, pad_id
from lorakit.train.tasks import Example


@dataclass
class ExactMatch:
    accuracy: float  # fraction in [0, 1]
    predictions: list[str]
    correct: list[bool]


def _prompt_ids(tok: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tok(prompt, add_special_tokens=False)["input_ids"])


def normalise(text: str) -> str:
    """The first non-empty line, stripped: how answers are compared."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tok: Any,
    examples: Sequence[Example],
    *,
    chat: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> ExactMatch:
    """Greedy-decode every prompt (left-padded batches) and compare the first line with the answer."""
    was_training = model.training
    model.eval()
    pad = pad_id(tok)
    device = next(model.parameters()).device
    preds: list[str] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not progress):
        chunk = examples[start : start + batch_size]
        prompts = [_prompt_ids(tok, ex.prompt, chat) for ex in chunk]
        T = max(map(len, prompts))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p) :] = torch.tensor(p)
            mask[i, T - len(p) :] = 1
        longest = max(len(tok(ex.answer, add_special_tokens=False)["input_ids"]) for ex in chunk)
        generate: Any = model.generate
        out = generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=longest + 4,
            do_sample=False,
            pad_token_id=pad,
        )
        preds += [normalise(tok.decode(row[T:], skip_special_tokens=True)) for row in out]
    model.train(was_training)
    correct = [p == ex.answer for p, ex in zip(preds, examples, strict=True)]
    return ExactMatch(sum(correct) / max(1, len(correct)), preds, correct)


@torch.no_grad()
def mean_loss(model: nn.Module, records: Sequence[Record], pad_id: int, batch_size: int = 8) -> tuple[float, float]:
    """(mean per-token loss over supervised tokens, perplexity)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = {k: v.to(device) for k, v in collate(records[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1): token t predicts t+1
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(loss)
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    mean = total / max(1, count)
    return mean, math.exp(min(mean, 50.0))


@torch.no_grad()
def classification_accuracy(
    model: nn.Module, records: Sequence[Record], pad_id: int, batch_size: int = 32
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a sequence classifier: ŷ = argmax_c logits[c], vs ``record.label``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, total_loss = 0, 0.0
    for start in range(0, len(records), batch_size):
        batch = {k: v.to(device) for k, v in collate(records[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
        labels = batch["labels"]  # (B,)
        correct += int((logits.argmax(-1) == labels).sum())
        total_loss += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
    model.train(was_training)
    n = max(1, len(records))
    return correct / n, total_loss / n
