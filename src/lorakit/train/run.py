"""A whole training run as the CLI and the demo do it: data, adapter, eval before, train, eval after, save.

The output folder is an adapter directory from the first step on (the initial adapter is saved
before training), beside ``metrics.jsonl``, ``loss_curve.png``, ``train_report.json`` and, while
a run is in progress, ``checkpoint.pt`` for ``resume``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.io.atomic import atomic_write_text
from lorakit.train.data import Record, encode_rows, pack, pad_id, read_jsonl
from lorakit.train.evaluate import exact_match, mean_loss
from lorakit.train.loop import TrainConfig, TrainResult, train
from lorakit.train.tasks import Example, task_examples


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything a training run needs besides the optimisation settings."""

    base: str = "smollm2-135m"
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    targets: str | list[str] = "all-linear"
    task: str | None = None
    data: str | None = None
    train_examples: int = 2000
    eval_examples: int = 64
    max_len: int = 256
    packing: bool = False
    chat: bool | None = None  # None: use the chat template when the tokenizer has one

    def __post_init__(self) -> None:
        if (self.task is None) == (self.data is None):
            raise ConfigError("give exactly one of --task (a built-in task) or --data (a JSONL file).")


@dataclass
class RunReport:
    spec: dict[str, Any]
    train: dict[str, Any]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)


def _data(spec: RunSpec, tok: Any, chat: bool, seed: int) -> tuple[list[Record], list[Record], list[Example]]:
    """(train records, held-out records, held-out examples for exact match)."""
    if spec.task is not None:
        train_ex = task_examples(spec.task, "train", spec.train_examples, seed=seed)
        held = task_examples(spec.task, "heldout", spec.eval_examples, seed=seed)
        rows = [{"prompt": e.prompt, "completion": e.answer} for e in train_ex]
        held_rows = [{"prompt": e.prompt, "completion": e.answer} for e in held]
        fmt = "prompt_completion"
    else:
        fmt, all_rows = read_jsonl(spec.data or "")
        all_rows = list(all_rows)
        random.Random(seed).shuffle(all_rows)
        n_held = min(spec.eval_examples, max(1, len(all_rows) // 10)) if len(all_rows) > 1 else 0
        held_rows, rows = all_rows[:n_held], all_rows[n_held:]
        held = [Example(r["prompt"], r["completion"]) for r in held_rows] if fmt == "prompt_completion" else []
    records = encode_rows(tok, fmt, rows, chat=chat, max_len=spec.max_len)
    held_records = encode_rows(tok, fmt, held_rows, chat=chat, max_len=spec.max_len)
    return (pack(records, spec.max_len) if spec.packing else records), held_records, held


def _evaluate(
    model: nn.Module, tok: Any, held_records: list[Record], held: list[Example], chat: bool
) -> dict[str, float]:
    out: dict[str, float] = {}
    pad = pad_id(tok)
    if held_records:
        out["loss"], out["perplexity"] = mean_loss(model, held_records, pad)
    if held:
        out["exact_match"] = exact_match(model, tok, held, chat=chat, progress=True).accuracy
    return out


def run_training(
    spec: RunSpec, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> RunReport:
    """Train an adapter as described; the adapter and its logs end up in ``out_dir``."""
    from lorakit.train.plot import plot_losses

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "adapter_config.json").exists():
        raise ConfigError(f"{out_dir} exists and is not an adapter directory; choose another --out.")
    method_cfg = lk.method_config(spec.method, **spec.method_options)
    model, tok = lk.load_base(spec.base)
    chat = bool(getattr(tok, "chat_template", None)) if spec.chat is None else spec.chat
    records, held_records, held = _data(spec, tok, chat, cfg.seed)
    report = RunReport(spec=asdict(spec), train=asdict(cfg))
    report.before = _evaluate(model, tok, held_records, held, chat)
    lk.attach(model, method_cfg, targets=spec.targets)
    resume = resume and (out_dir / "checkpoint.pt").exists()  # then the weights come from the checkpoint
    if not resume:
        lk.save_adapter(model, out_dir)  # out_dir is an adapter dir from the start
    pad = pad_id(tok)
    result: TrainResult = train(model, records, cfg, out_dir=out_dir, pad_id=pad, resume=resume, progress=progress)
    report.after = _evaluate(model, tok, held_records, held, chat)
    report.train_seconds, report.tokens_per_s, report.losses = result.seconds, result.tokens_per_s, result.losses
    if held:
        predictions = exact_match(model, tok, held[:5], chat=chat).predictions
        report.samples = [
            {"prompt": e.prompt, "answer": e.answer, "prediction": p} for e, p in zip(held, predictions, strict=False)
        ]
    lk.save_adapter(model, out_dir)
    plot_losses(result.losses, out_dir / "loss_curve.png", title=f"{spec.method} on {spec.task or spec.data}")
    atomic_write_text(out_dir / "train_report.json", json.dumps(asdict(report), indent=2) + "\n")
    return report
