"""`lorakit train` and `lorakit eval`: the training loop and held-out evaluation from the command line.

Every flag of ``train`` can also come from a YAML file (``--config run.yaml``) with the same
names (``batch_size`` or ``batch-size``); flags given on the command line win over the file.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from lorakit.cli._common import QUANTIZE_HELP, err, friendly_errors
from lorakit.cli._common import out as console
from lorakit.errors import ConfigError
from lorakit.train.callbacks import callback_names
from lorakit.train.optimizers import optimizer_names
from lorakit.train.placement import is_placement, placement_names

RUN_FIELDS = (
    "base",
    "method",
    "targets",
    "task",
    "data",
    "train_examples",
    "eval_examples",
    "max_len",
    "packing",
    "chat",
    "init_batches",
    "quantize",
)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["r=8", "init=gaussian"]`` -> ``{"r": 8, "init": "gaussian"}`` (values parsed as YAML scalars)."""
    opts: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt expects NAME=VALUE, got {pair!r}.")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return opts


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_settings(flags: dict[str, Any], config: Path | None) -> dict[str, Any]:
    """Flags that were given (not None) over the YAML file's values; unknown YAML keys are errors."""
    from lorakit.train.loop import TrainConfig

    settings = read_yaml(config) if config else {}
    known = set(RUN_FIELDS) | {f.name for f in dataclasses.fields(TrainConfig)} | {"opt", "out", "resume", "r", "alpha"}
    known |= {"dropout", "threads"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{config}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}.")
    settings.update({k: v for k, v in flags.items() if v is not None})
    return settings


def _report_table(report: Any, out_dir: Path) -> Table:
    table = Table(title=f"lorakit train -> {out_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(set(report.before) | set(report.after)):
        fmt = "{:.1%}" if key in ("exact_match", "accuracy") else "{:.4g}"
        table.add_row(
            key, fmt.format(report.before.get(key, float("nan"))), fmt.format(report.after.get(key, float("nan")))
        )
    table.add_row("train time", "", f"{report.train_seconds:.1f} s")
    table.add_row("tokens/s", "", f"{report.tokens_per_s:.0f}")
    return table


Opt = typer.Option


@friendly_errors
def train(
    out: Annotated[Path | None, Opt(help="Output adapter dir (also holds metrics.jsonl, loss_curve.png).")] = None,
    config: Annotated[Path | None, Opt(help="YAML file with any of these options.")] = None,
    base: Annotated[str | None, Opt(help="Bundled base name or local checkpoint dir (default smollm2-135m).")] = None,
    quantize: Annotated[str | None, Opt(help=QUANTIZE_HELP)] = None,
    method: Annotated[str | None, Opt(help="Registered method name (default lora).")] = None,
    r: Annotated[int | None, Opt(help="Adapter rank (methods with an r option).")] = None,
    alpha: Annotated[float | None, Opt(help="Adapter alpha (methods with an alpha option).")] = None,
    dropout: Annotated[float | None, Opt(help="Adapter dropout (methods with a dropout option).")] = None,
    opt: Annotated[
        list[str] | None,
        Opt(
            help="Other method option NAME=VALUE (repeatable), e.g. rslora=true, or init=pissa for an init "
            "(`lorakit info` lists them) with init_options='{niter: 4}'."
        ),
    ] = None,
    targets: Annotated[
        str | None,
        Opt(
            help="'all-linear', comma-separated suffixes, a regex, or a placement method that picks them from a few "
            f"training batches (--init-batches, default 8): auto:NAME or auto:NAME:KEY=VALUE,... ({placement_names()}; "
            "e.g. auto:plop:k=3, auto:diffora:k=6,per=module) (default all-linear)."
        ),
    ] = None,
    task: Annotated[str | None, Opt(help="Built-in task: addition, date, sort, reverse.")] = None,
    data: Annotated[
        str | None, Opt(help="JSONL file: prompt/completion, messages, text, or text/label (classification) records.")
    ] = None,
    steps: Annotated[int | None, Opt(help="Optimiser steps (default 100).")] = None,
    batch_size: Annotated[int | None, Opt(help="Sequences per micro-batch (default 8).")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches per step (default 1).")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate (default 2e-4).")] = None,
    schedule: Annotated[str | None, Opt(help="cosine, linear or constant (default cosine).")] = None,
    warmup: Annotated[int | None, Opt(help="Warm-up steps (default 0).")] = None,
    optimizer: Annotated[str | None, Opt(help=f"A registered optimizer: {optimizer_names()} (default adamw).")] = None,
    loraplus_ratio: Annotated[float | None, Opt(help="LoRA+ ratio lr_B / lr_A (default 16).")] = None,
    mixed_precision: Annotated[str | None, Opt(help="no, bf16 or fp16 (default no).")] = None,
    grad_checkpointing: Annotated[bool | None, Opt(help="Recompute activations to save memory.")] = None,
    seed: Annotated[int | None, Opt(help="Seed for data order, dropout and init (default 0).")] = None,
    save_every: Annotated[int | None, Opt(help="Checkpoint every N steps for --resume (0: never) (default 0).")] = None,
    callbacks: Annotated[
        list[str] | None,
        Opt(
            "--callback",
            help=f"Training callback to run, NAME or NAME:KEY=VALUE,... (repeatable; adapter_steps always runs): "
            f"{callback_names()}.",
        ),
    ] = None,
    resume: Annotated[bool, Opt(help="Continue from OUT/checkpoint.pt if present.")] = False,
    packing: Annotated[bool | None, Opt(help="Pack several records into each sequence.")] = None,
    max_len: Annotated[int | None, Opt(help="Longest sequence in tokens (default 256).")] = None,
    train_examples: Annotated[int | None, Opt(help="Training examples drawn from --task (default 2000).")] = None,
    eval_examples: Annotated[int | None, Opt(help="Held-out examples for evaluation (default 64).")] = None,
    chat: Annotated[bool | None, Opt("--chat/--no-chat", help="Use the chat template (default: if any).")] = None,
    threads: Annotated[int | None, Opt(help="torch CPU threads (default: torch's choice).")] = None,
    init_batches: Annotated[
        int | None,
        Opt(
            help="Training batches fed to a data-driven init (--opt init=lora_ga, eva, ...) or read by a --targets "
            "auto:... placement (default 8 where needed)."
        ),
    ] = None,
) -> None:
    """Train an adapter of any registered method on a built-in task or a JSONL file, evaluate it before and after."""
    import torch

    from lorakit.train.loop import TrainConfig
    from lorakit.train.run import RunSpec, run_training

    given = locals()  # exactly this command's parameters (an allow-list, so local names never leak in)
    flags = {name: given[name] for name in inspect.signature(train).parameters if name != "config"}
    flags["resume"] = resume or None
    s = merge_settings(flags, config)
    if s.get("out") is None:
        raise ConfigError("--out is required (the adapter directory to write).")
    if s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    method_options = parse_options(s.get("opt") or []) if isinstance(s.get("opt"), list) else dict(s.get("opt") or {})
    method_options.update({k: s[k] for k in ("r", "alpha", "dropout") if s.get(k) is not None})
    tgt = s.get("targets", "all-linear")
    if isinstance(tgt, str) and "," in tgt and not is_placement(tgt):
        tgt = [t.strip() for t in tgt.split(",") if t.strip()]
    spec = RunSpec(
        method_options=method_options,
        **{k: (tgt if k == "targets" else s[k]) for k in RUN_FIELDS if s.get(k) is not None or k == "targets"},
    )
    cfg = TrainConfig(**{f.name: s[f.name] for f in dataclasses.fields(TrainConfig) if s.get(f.name) is not None})
    report = run_training(spec, cfg, Path(s["out"]), resume=bool(s.get("resume")))
    console.print(_report_table(report, Path(s["out"])))
    if report.labels:
        console.print(f"  classes by id: {report.labels}")
    for sample in report.samples:
        console.print(f"  {sample['prompt']!r} -> {sample['prediction']!r} (expected {sample['answer']!r})")
    err.print(f"adapter, metrics.jsonl, loss_curve.png and train_report.json are in {s['out']}")


@friendly_errors
def evaluate(
    adapter: Annotated[Path | None, Opt(help="Adapter dir; without it the base model is evaluated.")] = None,
    base: Annotated[str, Opt(help="Bundled base name or local checkpoint dir.")] = "smollm2-135m",
    quantize: Annotated[str | None, Opt(help=QUANTIZE_HELP)] = None,
    task: Annotated[str | None, Opt(help="Built-in task (held-out split): exact match and loss.")] = None,
    data: Annotated[
        Path | None, Opt(help="JSONL file: loss and perplexity (and exact match for prompt/completion).")
    ] = None,
    n: Annotated[int, Opt(min=1, help="Held-out examples from --task.")] = 64,
    chat: Annotated[bool | None, Opt("--chat/--no-chat", help="Use the chat template (default: if any).")] = None,
    seed: Annotated[int, Opt(help="Task seed (as in training).")] = 0,
) -> None:
    """Evaluate a base model, or a base plus ADAPTER, on a task's held-out split or a JSONL file."""
    import lorakit as lk
    from lorakit.train.data import encode_rows, pad_id, read_jsonl
    from lorakit.train.evaluate import exact_match, mean_loss
    from lorakit.train.tasks import Example, task_examples

    if (task is None) == (data is None):
        raise ConfigError("give exactly one of --task or --data.")
    fmt, rows = read_jsonl(data) if data is not None else ("prompt_completion", [])
    if fmt == "text_label":
        raise ConfigError(
            f"{data} holds text/label (classification) records, which `lorakit eval` does not score yet; "
            "`lorakit train` reports their held-out accuracy in train_report.json."
        )
    model, tok = lk.load_base(base, quantize=quantize)
    if adapter is not None:
        lk.load_adapter(model, adapter)
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if task is not None:
        examples = task_examples(task, "heldout", n, seed=seed)
        fmt, rows = "prompt_completion", [{"prompt": e.prompt, "completion": e.answer} for e in examples]
    else:
        examples = [Example(r["prompt"], r["completion"]) for r in rows] if fmt == "prompt_completion" else []
    pad = pad_id(tok)
    loss, ppl = mean_loss(model, encode_rows(tok, fmt, rows, chat=use_chat, max_len=1024), pad)
    table = Table(title=f"lorakit eval: {adapter or base} on {task or data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss", f"{loss:.4f}")
    table.add_row("perplexity", f"{ppl:.3f}")
    if examples:
        em = exact_match(model, tok, examples, chat=use_chat, progress=True)
        table.add_row("exact match", f"{em.accuracy:.1%} of {len(examples)}")
    console.print(table)
