"""A whole training run as the CLI and the demo do it: data, adapter, eval before, train, eval after, save.

The output folder is an adapter directory from the first step on (the initial adapter is saved
before training), beside ``metrics.jsonl``, ``loss_curve.png``, ``train_report.json`` and, while
a run is in progress, ``checkpoint.pt`` for ``resume``.

``targets="auto:NAME[:KEY=VALUE,...]"`` (``auto:plop``, ``auto:diffora``; ``lorakit.train.placement``) picks the
targets from the base model and the first ``init_batches`` (default 8) training batches before the adapter is
attached; the chosen list is ``RunReport.targets`` (in ``train_report.json``).

A ``{"text","label"}`` file trains a sequence classifier instead: the base checkpoint is loaded as
``AutoModelForSequenceClassification`` with a new (seeded) head, the adapter targets the encoder's
layers and keeps a trainable copy of ``classifier`` (``modules_to_save``), the loss is HF's
cross-entropy on the class ids, and held-out accuracy (argmax) replaces exact match.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.initialize import needs_calibration
from lorakit.io.atomic import atomic_write_text
from lorakit.train.data import Record, collate, encode_labelled, encode_rows, label_names, pack, pad_id, read_jsonl
from lorakit.train.evaluate import classification_accuracy, exact_match, mean_loss
from lorakit.train.loop import TrainConfig, TrainResult, batch_indices, train
from lorakit.train.placement import check_placement, is_placement, place
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
    init_batches: int | None = None  # calibration batches for data-driven inits (None: 8 where a method needs data)
    quantize: str | None = None  # a quantization kind (nf4, fp4, int8) for the base's Linear layers: QLoRA

    def __post_init__(self) -> None:
        if (self.task is None) == (self.data is None):
            raise ConfigError("give exactly one of --task (a built-in task) or --data (a JSONL file).")
        if self.init_batches is not None and (not isinstance(self.init_batches, int) or self.init_batches < 1):
            raise ConfigError(f"--init-batches must be a positive integer, got {self.init_batches!r}.")
        if is_placement(self.targets):
            check_placement(str(self.targets))  # an unknown placement or bad option fails before any model loads


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
    labels: list[Any] = field(default_factory=list)  # classification: class names by id
    targets: str | list[str] = "all-linear"  # what the adapter was attached with (a placement's choice for auto:...)


DEFAULT_INIT_BATCHES = 8


def calibration_batches(
    spec: RunSpec, records: list[Record], cfg: TrainConfig, pad: int
) -> list[dict[str, torch.Tensor]] | None:
    """The first ``init_batches`` training micro-batches (in the loop's own order), for inits that read data.

    None when the method needs no data and ``--init-batches`` was not given; 8 batches by default otherwise.
    """
    n = spec.init_batches
    if n is None:
        if not needs_calibration(lk.REGISTRY[spec.method], lk.method_config(spec.method, **spec.method_options)):
            return None
        n = DEFAULT_INIT_BATCHES
    if not records:
        raise ConfigError("no training records to calibrate the initialisation with.")
    return _first_batches(records, cfg, pad, n)


def _first_batches(records: list[Record], cfg: TrainConfig, pad: int, n: int) -> list[dict[str, torch.Tensor]]:
    return [
        collate([records[i] for i in batch_indices(len(records), cfg.batch_size, k, cfg.seed)], pad) for k in range(n)
    ]


def resolve_targets(
    spec: RunSpec,
    model: nn.Module,
    records: list[Record],
    cfg: TrainConfig,
    pad: int,
    exclude: list[str] | None = None,
    *,
    progress: bool = True,
) -> str | list[str]:
    """``spec.targets``, or for ``auto:NAME[:opts]`` the list that placement picks on ``model`` (before any
    adapter) from the first ``init_batches`` (default 8) training micro-batches, seeded by ``cfg.seed``."""
    if not is_placement(spec.targets):
        return spec.targets
    if not records:
        raise ConfigError(f"no training records for the placement {spec.targets!r} to read.")
    batches = _first_batches(records, cfg, pad, spec.init_batches or DEFAULT_INIT_BATCHES)
    chosen = place(model, batches, str(spec.targets), seed=cfg.seed, exclude=exclude)
    if progress:
        print(f"placement {spec.targets}: targets = {chosen}")
    return chosen


def _split(
    spec: RunSpec, all_rows: list[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(held-out rows, training rows): a seeded shuffle, then min(eval_examples, 10%) rows held out."""
    all_rows = list(all_rows)
    random.Random(seed).shuffle(all_rows)
    n_held = min(spec.eval_examples, max(1, len(all_rows) // 10)) if len(all_rows) > 1 else 0
    return all_rows[:n_held], all_rows[n_held:]


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
        held_rows, rows = _split(spec, all_rows, seed)
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


def _seqcls_base(base: str, num_labels: int, seed: int) -> tuple[nn.Module, Any]:
    """(sequence classifier on ``base``'s encoder with a head seeded by ``seed``, tokenizer), offline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lorakit.errors import BaseModelError
    from lorakit.models import BUNDLED, MINILM_HUB_ID, SMOLLM2_HUB_ID, base_dir

    folder = base_dir(base) if base in BUNDLED else Path(base).expanduser()
    torch.manual_seed(seed)  # the new head's initialisation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": expected, the head is new
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load {base} as a sequence classifier: {str(e).strip().splitlines()[0]}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if not isinstance(getattr(model, "classifier", None), nn.Module):
        raise ConfigError(f"{type(model).__name__} has no 'classifier' head; text/label data needs an encoder base.")
    names = {"smollm2-135m": SMOLLM2_HUB_ID, "minilm-l6": MINILM_HUB_ID}
    model.config._name_or_path = names.get(base, str(folder))
    model.eval()
    return model, tok


def _run_seqcls(
    spec: RunSpec, cfg: TrainConfig, rows: list[dict[str, Any]], out_dir: Path, *, resume: bool, progress: bool
) -> RunReport:
    """Classification run: labels -> ids, classifier from the encoder, accuracy before and after."""
    if spec.packing:
        raise ConfigError("packing joins sequences and cannot be used with text/label (classification) data.")
    method_cfg = lk.method_config(spec.method, **spec.method_options)
    names = label_names(rows)
    model, tok = _seqcls_base(spec.base, len(names), cfg.seed)
    if spec.quantize is not None:  # the new head stays full precision (it trains whole)
        lk.quantize(model, spec.quantize, skip=("classifier", "score"))
    held_rows, train_rows = _split(spec, rows, cfg.seed)
    records = encode_labelled(tok, train_rows, names, spec.max_len)
    held = encode_labelled(tok, held_rows, names, spec.max_len)
    pad = pad_id(tok)

    def evaluate() -> dict[str, float]:
        if not held:
            return {}
        acc, loss = classification_accuracy(model, held, pad)
        return {"accuracy": acc, "loss": loss}

    report = RunReport(spec=asdict(spec), train=asdict(cfg), labels=list(names))
    report.before = evaluate()
    calibration = calibration_batches(spec, records, cfg, pad)
    report.targets = resolve_targets(spec, model, records, cfg, pad, ["classifier"], progress=progress)
    lk.attach(
        model,
        method_cfg,
        targets=report.targets,
        exclude=["classifier"],
        modules_to_save=["classifier"],
        calibration=calibration,
    )
    return _train_and_save(model, records, cfg, out_dir, pad, report, evaluate, resume=resume, progress=progress)


def _train_and_save(
    model: nn.Module,
    records: list[Record],
    cfg: TrainConfig,
    out_dir: Path,
    pad: int,
    report: RunReport,
    evaluate: Callable[[], dict[str, float]],
    *,
    resume: bool,
    progress: bool,
) -> RunReport:
    """Save the initial adapter, train, evaluate after, save the adapter, loss curve and report."""
    from lorakit.train.plot import plot_losses

    resume = resume and (out_dir / "checkpoint.pt").exists()  # then the weights come from the checkpoint
    if not resume:
        lk.save_adapter(model, out_dir)  # out_dir is an adapter dir from the start
    result: TrainResult = train(model, records, cfg, out_dir=out_dir, pad_id=pad, resume=resume, progress=progress)
    report.after = evaluate()
    report.train_seconds, report.tokens_per_s, report.losses = result.seconds, result.tokens_per_s, result.losses
    lk.save_adapter(model, out_dir)
    spec = report.spec
    plot_losses(result.losses, out_dir / "loss_curve.png", title=f"{spec['method']} on {spec['task'] or spec['data']}")
    atomic_write_text(out_dir / "train_report.json", json.dumps(asdict(report), indent=2) + "\n")
    return report


def run_training(
    spec: RunSpec, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> RunReport:
    """Train an adapter as described; the adapter and its logs end up in ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "adapter_config.json").exists():
        raise ConfigError(f"{out_dir} exists and is not an adapter directory; choose another --out.")
    if spec.data is not None:
        fmt, rows = read_jsonl(spec.data)
        if fmt == "text_label":
            return _run_seqcls(spec, cfg, rows, out_dir, resume=resume, progress=progress)
    method_cfg = lk.method_config(spec.method, **spec.method_options)
    model, tok = lk.load_base(spec.base, quantize=spec.quantize)
    chat = bool(getattr(tok, "chat_template", None)) if spec.chat is None else spec.chat
    records, held_records, held = _data(spec, tok, chat, cfg.seed)
    report = RunReport(spec=asdict(spec), train=asdict(cfg))
    report.before = _evaluate(model, tok, held_records, held, chat)
    pad = pad_id(tok)
    report.targets = resolve_targets(spec, model, records, cfg, pad, progress=progress)
    lk.attach(model, method_cfg, targets=report.targets, calibration=calibration_batches(spec, records, cfg, pad))
    _train_and_save(
        model,
        records,
        cfg,
        out_dir,
        pad,
        report,
        lambda: _evaluate(model, tok, held_records, held, chat),
        resume=resume,
        progress=progress,
    )
    if held:
        predictions = exact_match(model, tok, held[:5], chat=chat).predictions
        report.samples = [
            {"prompt": e.prompt, "answer": e.answer, "prediction": p} for e, p in zip(held, predictions, strict=False)
        ]
        atomic_write_text(out_dir / "train_report.json", json.dumps(asdict(report), indent=2) + "\n")
    return report
