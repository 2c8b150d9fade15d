"""RILQ: Rank-Insensitive LoRA-based Quantization Error Compensation — https://arxiv.org/abs/2412.01129
Update rule: min over all adapters θ at once of Σ_outputs mean ‖h_student(x; Q + s·B·A) − h_teacher(x; W)‖² on
calibration batches x (one optimizer over every layer's adapter, not layer by layer).

A procedure, not an adapter method: the adapters are whichever method the user attached (plain LoRA in the paper)
to a low-bit quantized copy of the model (``lk.quantize(copy, "int2g")``), and ``rilq`` trains them so that the
quantized model's activations match the full-precision teacher's. The discrepancy is model-level: by default the
final hidden state (the last decoder layer's output after the final norm, ``outputs="hidden"``), or the logits
(``"logits"``), or the outputs of named modules of both models (``outputs=["model.layers.0", ...]``, summed).
Each term is a mean squared error over the batch's tokens (padding left out through ``attention_mask``) and
hidden units. The paper's optional ground-truth (next-token) term is not included. Afterwards ``lk.merge`` folds
the adapters into the quantized base (re-quantized with its kind, with a drift report) or dequantizes it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers._wrapper import WRAPPERS


@dataclass
class RilqResult:
    """What a RILQ run did: the discrepancy on all calibration batches before and after, and each step's loss."""

    before: float  # mean discrepancy over the calibration batches at step 0
    after: float  # the same after the last step
    losses: list[float] = field(default_factory=list)  # the training loss of each step (one batch each)


def _batch(b: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": b} if isinstance(b, torch.Tensor) else dict(b)


def _run(model: nn.Module, batch: dict[str, torch.Tensor], outputs: str | Sequence[str]) -> list[torch.Tensor]:
    """The activations the discrepancy compares, each (B, T, d)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(outputs, str):
        result: Any = model(**inputs, output_hidden_states=outputs == "hidden")
        return [result.hidden_states[-1] if outputs == "hidden" else result.logits]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            seen[name] = out[0] if isinstance(out, tuple) else out  # a decoder layer may return (h, ...)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in outputs]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return [seen[n] for n in outputs]


def _loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    total = torch.zeros((), device=student[0].device)
    for hs, ht in zip(student, teacher, strict=True):
        sq = (hs.float() - ht.float()).pow(2).mean(-1)  # (B, T)
        total = total + (sq.mean() if mask is None else (sq * mask).sum() / mask.sum().clamp(min=1))
    return total


def discrepancy(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    outputs: str | Sequence[str] = "hidden",
) -> float:
    """The mean over ``batches`` of RILQ's loss: Σ_outputs mean ‖h_student − h_teacher‖² (no gradients)."""
    values = []
    with torch.no_grad():
        for b in batches:
            batch = _batch(b)
            mask = batch.get("attention_mask")
            values.append(float(_loss(_run(student, batch, outputs), _run(teacher, batch, outputs), mask)))
    return sum(values) / max(len(values), 1)


def rilq(
    teacher: nn.Module,
    student: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    outputs: str | Sequence[str] = "hidden",
) -> RilqResult:
    """Train every trainable parameter of ``student`` (its adapters) jointly, for ``steps`` AdamW steps at ``lr``
    (one calibration batch a step, cycling), to minimise the activation discrepancy to ``teacher``; in place.

    ``teacher`` is the full-precision model, ``student`` a quantized copy with adapters attached
    (``lk.attach(lk.quantize(copy.deepcopy(fp), "int2g"), lk.method_config("lora", r=...))``). ``batches``: dicts
    with ``input_ids`` (and ``attention_mask``), or (B, T) id tensors. ``outputs``: "hidden", "logits" or module
    names (see the module docstring)."""
    data = [_batch(b) for b in batches]
    if not data:
        raise ConfigError("rilq needs at least one calibration batch (a dict with input_ids, or a (B, T) tensor).")
    if not (isinstance(steps, int) and steps >= 1) or not lr > 0:
        raise ConfigError(f"rilq needs steps >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}.")
    if isinstance(outputs, str) and outputs not in ("hidden", "logits"):
        raise ConfigError(f"outputs must be 'hidden', 'logits' or a list of module names, got {outputs!r}.")
    names = {n for n, _ in student.named_modules()} & {n for n, _ in teacher.named_modules()}
    missing = [] if isinstance(outputs, str) else [n for n in outputs if n not in names]
    if missing:
        raise ConfigError(f"outputs names modules that the teacher and student do not both have: {missing}.")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params or not any(isinstance(m, WRAPPERS) for m in student.modules()):
        raise ConfigError(
            "rilq trains the student's adapters, but it has none (or none trainable); lk.attach one first."
        )
    if any(p is q for p in params for q in teacher.parameters()):
        raise ConfigError("the student shares parameters with the teacher; quantize a copy (copy.deepcopy(model)).")
    before = discrepancy(teacher, student, data, outputs)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for batch in itertools.islice(itertools.cycle(data), steps):
        with torch.no_grad():
            target = _run(teacher, batch, outputs)
        loss = _loss(_run(student, batch, outputs), target, batch.get("attention_mask"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return RilqResult(before, discrepancy(teacher, student, data, outputs), losses)
