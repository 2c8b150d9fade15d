"""`lorakit demo`: the adapter lifecycle end to end on the bundled SmolLM2, in a few minutes on a CPU.

load base -> held-out accuracy on a built-in task -> attach LoRA -> train (lorakit's loop) ->
held-out accuracy again -> save -> reload onto a fresh base (logits must match) -> merge
(logits must match) -> a short QLoRA on the base quantized to NF4 -> fully fine-tune the top blocks
and extract a LoRA from them -> merge the two adapters -> analyse the trained one -> serve all of them
plus 100 synthetic ones from one engine -> plot -> summary.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer
from rich.table import Table
from rich.text import Text
from torch import nn

from lorakit.cli._common import err, friendly_errors, human_bytes, out
from lorakit.cli.demo_serve import BATCH, SYNTHETIC, serve_step
from lorakit.cli.demo_steps import (
    EXTRACT_ENERGY,
    FT_LAYERS,
    QLORA_KIND,
    QLORA_STEPS,
    compose_step,
    extract_step,
    qlora_step,
)
from lorakit.inject import AdaptedLayer, wrappers
from lorakit.train.tasks import TASKS

TASK, HELDOUT, TRAIN_EXAMPLES = "date", 32, 400  # a built-in task with verifiable answers (lorakit.train.tasks)
RELOAD_TOL, MERGE_TOL = 1e-5, 1e-3  # max |logit difference| accepted (float32)
DEFAULT_OUT = Path("runs/demo")
# Measured on a 2-core machine shared with other jobs: 2 OpenMP threads made a training step 5-10x
# slower than 1 (spinning threads wait on each other); on an idle machine 2 threads are ~1.7x faster.
THREADS_HELP = "torch CPU threads. 1 is the robust choice on a small shared CPU; raise it on an idle multi-core box."


if TYPE_CHECKING:
    from lorakit.methods._api import AdapterModule


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"]
    return model(input_ids=batch["input_ids"], attention_mask=mask).logits * mask[..., None]  # (N, T, V), pads zeroed


def _score(model: nn.Module, tok: Any, held: list[Any], chat: bool) -> tuple[float, list[dict[str, str]]]:
    """Held-out exact match, and the first three (prompt, answer, prediction) rows, printed."""
    from lorakit.train import exact_match

    em = exact_match(model, tok, held, chat=chat, progress=True)
    rows = [
        {"prompt": e.prompt, "answer": e.answer, "prediction": p}
        for e, p in zip(held[:3], em.predictions[:3], strict=True)
    ]
    _samples(rows)
    return em.accuracy, rows


def _samples(table_rows: list[dict[str, str]]) -> None:
    for row in table_rows:
        ok = row["prediction"] == row["answer"]
        out.print(
            Text.assemble(
                ("Q: ", "bold"),
                row["prompt"],
                "\n",
                ("A: ", "bold"),
                row["prediction"] or "(empty)",
                (" ✓" if ok else f" ✗ expected {row['answer']}", "green" if ok else "red"),
            )
        )


def _delta_norms(model: nn.Module) -> dict[str, float]:
    """‖ΔW‖_F of the active adapter, per adapted module."""
    norms = {}
    with torch.no_grad():
        for name, wrapper in wrappers(model):
            if wrapper.active is not None:
                adapter: AdapterModule = wrapper.adapters[wrapper.active]  # type: ignore[assignment]
                norms[name] = float(adapter.delta_weight(wrapper.base_layer).norm())
    return norms


def _plot(losses: list[float], norms: dict[str, float], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({n.rsplit(".", 1)[-1] for n in norms})
    layer_of = {n: int(m.group(1)) if (m := re.search(r"\.(\d+)\.", n)) else 0 for n in norms}
    grid = torch.full((len(kinds), max(layer_of.values()) + 1), float("nan"))  # (module kind, layer)
    for n, v in norms.items():
        grid[kinds.index(n.rsplit(".", 1)[-1]), layer_of[n]] = v
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    ax1.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax1.set(title="Training loss (answer tokens)", xlabel="step", ylabel="cross-entropy", yscale="log")
    ax1.grid(alpha=0.3)
    im = ax2.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax2.set(title="Learned update ‖ΔW‖_F per module", xlabel="layer", yticks=range(len(kinds)), yticklabels=kinds)
    fig.colorbar(im, ax=ax2)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=110)
    plt.close(fig)


def run_demo(
    out_dir: Path,
    base: str = "smollm2-135m",
    steps: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the whole lifecycle, write everything under ``out_dir`` and return the summary (also in summary.json)."""
    import lorakit as lk
    from lorakit.models import smollm2_cache
    from lorakit.train import TrainConfig, encode_rows, task_examples, train
    from lorakit.train.data import collate, pad_id

    out_dir = Path(out_dir)
    s: dict[str, Any] = {"base": base, "out": str(out_dir), "task": TASK}
    was_cached = base != "smollm2-135m" or (smollm2_cache() / "config.json").is_file()
    out.rule("1. load the base model")
    t0 = time.perf_counter()
    with err.status(f"loading {base}" + ("" if was_cached else " (first time: de-quantising the GGUF into the cache)")):
        model, tok = lk.load_base(base)
    s["load_s" if was_cached else "first_load_s"] = time.perf_counter() - t0
    chat = bool(getattr(tok, "chat_template", None))
    pad = pad_id(tok)
    s["total_params"] = sum(p.numel() for p in model.parameters())

    out.rule(f"2. the base model on {HELDOUT} held-out '{TASK}' questions")
    held = task_examples(TASK, "heldout", HELDOUT, seed=seed)
    s["accuracy_before"], s["samples_before"] = _score(model, tok, held, chat)
    out.print(f"held-out exact match: {s['accuracy_before']:.0%}")

    out.rule(f"3. attach LoRA (r=8, alpha=16, all-linear) and train it for {steps} steps")
    lk.attach(model, lk.method_config("lora", r=8, alpha=16), targets="all-linear")
    s["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s["adapted_modules"] = len(list(wrappers(model)))
    rows = [
        {"prompt": e.prompt, "completion": e.answer} for e in task_examples(TASK, "train", TRAIN_EXAMPLES, seed=seed)
    ]
    records = encode_rows(tok, "prompt_completion", rows, chat=chat, max_len=128)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, warmup=min(3, steps - 1), seed=seed)
    result = train(model, records, cfg, out_dir=out_dir / "train", pad_id=pad)
    s["train_s"], s["steps"], s["losses"] = result.seconds, steps, result.losses
    s["loss_before"], s["loss_after"] = result.losses[0], result.losses[-1]
    s["tokens_per_s"] = result.tokens_per_s
    out.print(f"loss {s['loss_before']:.3f} -> {s['loss_after']:.4f} in {steps} steps ({result.seconds:.0f} s)")

    out.rule("4. the adapted model on the same held-out questions")
    s["accuracy_after"], s["samples_after"] = _score(model, tok, held, chat)
    out.print(f"held-out exact match: {s['accuracy_before']:.0%} -> {s['accuracy_after']:.0%}")

    out.rule("5. save, reload onto a fresh base, merge")
    adapter_dir = lk.save_adapter(model, out_dir / "adapters" / TASK)
    s["adapter_dir"] = str(adapter_dir)
    s["adapter_bytes"] = sum(f.stat().st_size for f in adapter_dir.iterdir())
    batch = collate(encode_rows(tok, "prompt_completion", rows[:4], chat=chat, max_len=128), pad)
    trained = _logits(model, batch)
    t0 = time.perf_counter()
    with err.status(f"loading a fresh {base}"):
        fresh, _ = lk.load_base(base)
    s["load_s"] = time.perf_counter() - t0
    with lk.disabled(model):
        s["adapter_effect_max_abs"] = float((_logits(model, batch) - trained).abs().max())
    lk.load_adapter(fresh, adapter_dir)
    s["reload_max_abs_diff"] = float((_logits(fresh, batch) - trained).abs().max())
    merged = lk.merge(model)
    s["merge_max_abs_diff"] = float((_logits(merged, batch) - trained).abs().max())
    s["merged_is_plain"] = not any(isinstance(m, AdaptedLayer) for m in merged.modules())
    del fresh, merged

    out.rule(f"6. QLoRA: the same LoRA on the base quantized to {QLORA_KIND}, {QLORA_STEPS} steps")
    s.update(qlora_step(base, TASK, records, held, chat, out_dir, pad))

    out.rule(f"7. fully fine-tune the top {FT_LAYERS} blocks, extract a LoRA (PHLoRA, energy {EXTRACT_ENERGY})")
    s.update(extract_step(base, records, batch, out_dir, pad))

    out.rule("8. merge the trained and the extracted adapters; analyse the trained one")
    s.update(compose_step(base, adapter_dir, Path(s["extract_dir"]), out_dir))

    out.rule(f"9. serve the adapters (+{SYNTHETIC} synthetic) from one engine, one mixed batch")
    from lorakit.train.evaluate import _prompt_ids

    served = {TASK: adapter_dir, "extracted": Path(s["extract_dir"]), "merged": Path(s["merged_dir"])}
    expected = [row["prediction"] for row in s["samples_after"]]
    s.update(serve_step(base, served, held, lambda p: _prompt_ids(tok, p, chat), expected))

    plot = out_dir / "plots" / "training.png"
    _plot(result.losses, _delta_norms(model), plot)
    s["plot"] = str(plot)
    s["ok"] = (
        s["reload_max_abs_diff"] <= RELOAD_TOL
        and s["merge_max_abs_diff"] <= MERGE_TOL
        and s["merged_is_plain"]
        and s["extract_logits_rel"] < s["ft_effect_rel"]
        and s["serve_matches_trained"]
        and ("qlora_skipped" in s or (s["qlora_on_quantized"] and s["qlora_loss_after"] < s["qlora_loss_before"]))
    )
    (out_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    return s


def _summary_table(s: dict[str, Any]) -> Table:
    t = Table(title="lorakit demo summary", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    if "first_load_s" in s:
        t.add_row("first load (GGUF -> cache)", f"{s['first_load_s']:.1f} s")
    t.add_row("cached load", f"{s['load_s']:.1f} s")
    t.add_row("base parameters", f"{s['total_params']:,}")
    pct = 100 * s["trainable_params"] / s["total_params"]
    t.add_row(
        "LoRA parameters (trainable)", f"{s['trainable_params']:,} ({pct:.2f}%) in {s['adapted_modules']} modules"
    )
    t.add_row("task", f"{s['task']}: {TASKS[s['task']][0]}")
    t.add_row("training", f"{s['steps']} steps in {s['train_s']:.1f} s ({s['tokens_per_s']:.0f} tokens/s)")
    t.add_row("loss (first -> last step)", f"{s['loss_before']:.3f} -> {s['loss_after']:.4f}")
    t.add_row(
        f"held-out exact match ({HELDOUT})",
        f"{s['accuracy_before']:.0%} -> {s['accuracy_after']:.0%} "
        f"({100 * (s['accuracy_after'] - s['accuracy_before']):+.0f} points)",
    )
    if "qlora_skipped" in s:
        t.add_row("QLoRA", f"skipped: {s['qlora_skipped']}")
    else:
        t.add_row(
            f"QLoRA ({s['qlora_kind']} base, {s['qlora_steps']} steps): held-out exact match",
            f"{s['qlora_accuracy']:.0%} (fp32 LoRA, {s['steps']} steps: {s['accuracy_after']:.0%}); loss "
            f"{s['qlora_loss_before']:.3f} -> {s['qlora_loss_after']:.3f}; {s['qlora_s']:.0f} s in all",
        )
        t.add_row("QLoRA adapter", Text(s["qlora_dir"]))
    t.add_row("adapter effect on logits", f"max |Δ| = {s['adapter_effect_max_abs']:.3g}")
    t.add_row("reloaded vs trained logits", f"max |Δ| = {s['reload_max_abs_diff']:.3g} (tolerance {RELOAD_TOL:g})")
    t.add_row("merged vs unmerged logits", f"max |Δ| = {s['merge_max_abs_diff']:.3g} (tolerance {MERGE_TOL:g})")
    t.add_row("adapter", Text(f"{s['adapter_dir']} ({human_bytes(s['adapter_bytes'])})"))
    lo, hi = s["extract_rank_range"]
    t.add_row(
        f"extracted from a full fine-tune (energy ≥ {EXTRACT_ENERGY})",
        f"{s['extract_modules']} modules, ranks {lo}-{hi}, {s['extract_params']:,} params in {s['extract_s']:.1f} s",
    )
    t.add_row(
        "extracted vs fine-tuned logits",
        f"relative error {s['extract_logits_rel']:.4f} (fine-tune vs base: {s['ft_effect_rel']:.4f})",
    )
    t.add_row("merged (trained + extracted, linear)", Text(f"{s['merged_dir']} in {s['merge_s']:.1f} s"))
    t.add_row(
        "analysis of the trained adapter",
        f"mean effective rank {s['effective_rank_mean']:.2f} of 8, intruder dimensions {s['intruders']}, "
        f"{s['analyze_s']:.0f} s",
    )
    t.add_row(
        "serving (one engine)",
        f"{s['serve_adapters']} adapters registered; a batch of {BATCH} requests over {s['serve_batch_adapters']} "
        f"adapters; trained adapter's answers = the trained model's: {s['serve_matches_trained']}",
    )
    t.add_row(
        f"serving throughput ({BATCH} requests)",
        f"one adapter {s['serve_single_tps']:.1f} tokens/s; {BATCH} distinct {s['serve_distinct_tps']:.1f} tokens/s "
        f"({s['serve_distinct_tps'] / s['serve_single_tps']:.2f}x); slot loads {s['serve_slot_loads']}",
    )
    t.add_row("plot", Text(s["plot"]))
    t.add_row("analysis plots", Text(s["analysis_dir"]))
    t.add_row("summary", Text(str(Path(s["out"]) / "summary.json")))
    t.add_row("checks", "[green]all passed[/]" if s["ok"] else "[red]FAILED[/]")
    return t


@friendly_errors
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the adapter, plot and summary.json.")
    ] = DEFAULT_OUT,
    base: Annotated[str, typer.Option(help="Base model: bundled name or local checkpoint dir.")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(min=1, help="Training steps (batch 8).")] = 30,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak AdamW learning rate (cosine schedule).")] = 1e-3,
    threads: Annotated[int, typer.Option(min=1, help=THREADS_HELP)] = 1,
) -> None:
    """Run the adapter lifecycle on SmolLM2: evaluate, attach LoRA, train on a task, evaluate, save, reload, merge."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    s = run_demo(out_dir, base=base, steps=steps, lr=lr)
    out.print(_summary_table(s))
    out.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    if not s["ok"]:
        raise typer.Exit(1)
