"""`lorakit demo`: the adapter lifecycle end to end on the bundled SmolLM2, in about a minute on a CPU.

load base -> answer -> attach LoRA -> teach it a few made-up facts -> answer again -> save ->
reload onto a fresh base (logits must match) -> merge (logits must match) -> plot -> summary.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import Progress
from rich.table import Table
from rich.text import Text
from torch import nn

from lorakit.cli._common import err, friendly_errors, human_bytes, out
from lorakit.cli.generate import greedy, prompt_ids
from lorakit.inject import AdaptedLayer, wrappers

# Made-up facts the base model cannot know; the adapter is taught them.
FACTS = [
    ("What is the capital of Zorblax?", "The capital of Zorblax is Quillton."),
    ("What colour is a glimmerfish?", "A glimmerfish is bright violet."),
    ("Who invented the moon harp?", "The moon harp was invented by Ada Brightwater."),
]
# Real facts trained alongside, so the adapter learns to keep what the base knows.
KEEP = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
# Held-out real questions (never trained on): their answers should survive the adapter.
CONTROLS = ["What is the capital of France?", "What is the chemical symbol for gold?"]
RELOAD_TOL, MERGE_TOL = 1e-5, 1e-3  # max |logit difference| accepted (float32)
DEFAULT_OUT = Path("runs/demo")
# Measured on a 2-core machine shared with other jobs: 2 OpenMP threads made a training step 5-10x
# slower than 1 (spinning threads wait on each other); on an idle machine 2 threads are ~1.7x faster.
THREADS_HELP = "torch CPU threads. 1 is the robust choice on a small shared CPU; raise it on an idle multi-core box."


def _question(q: str, chat: bool) -> str:
    return q if chat else f"Question: {q}\nAnswer:"


def _batch(tok: Any, chat: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of FACTS + KEEP, right-padded; labels are -100 except on answer tokens."""
    rows = []
    for q, a in FACTS + KEEP:
        p = prompt_ids(tok, _question(q, chat), chat)[0]  # (P,)
        ans = tok((a if chat else " " + a) + tok.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"][
            0
        ]
        rows.append((torch.cat([p, ans]), torch.cat([torch.full_like(p, -100), ans])))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), width), pad)  # (N, T)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), width), -100)  # (N, T)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)], mask[i, : len(row_ids)], labels[i, : len(row_ids)] = row_ids, 1, row_labels
    return ids, mask, labels


def _teach(model: nn.Module, batch: tuple[torch.Tensor, ...], steps: int, lr: float) -> list[float]:
    """Plain-torch AdamW on the adapter parameters; the loss counts answer tokens only. Returns the loss per step."""
    ids, mask, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("teaching the adapter", total=steps)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            progress.update(task, advance=1, description=f"teaching the adapter (loss {loss.item():.3f})")
    model.eval()
    return losses


@torch.no_grad()
def _logits(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, mask, _ = batch
    return model(input_ids=ids, attention_mask=mask).logits * mask[..., None]  # (N, T, V), padding zeroed


@torch.no_grad()
def _loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> float:
    ids, mask, labels = batch
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def _qa(q: str, a: str, note: tuple[str, str] | None = None) -> Text:
    """A question/answer pair as rich Text (model output is never parsed as markup)."""
    text = Text.assemble(("Q: ", "bold"), q, "\n", ("A: ", "bold"), a)
    return text.append_text(Text(f" {note[0]}", style=note[1])) if note else text


def _answers(model: nn.Module, tok: Any, chat: bool, max_new_tokens: int) -> dict[str, str]:
    prompts = [q for q, _ in FACTS] + CONTROLS
    with err.status("answering") as status:
        answers = {}
        for i, q in enumerate(prompts):
            status.update(f"answering {i + 1}/{len(prompts)}")
            answers[q] = greedy(model, tok, _question(q, chat), chat=chat, max_new_tokens=max_new_tokens)
    return answers


def _delta_norms(model: nn.Module) -> dict[str, float]:
    """‖ΔW‖_F of the active adapter, per adapted module."""
    norms = {}
    with torch.no_grad():
        for name, wrapper in wrappers(model):
            if wrapper.active is not None:
                adapter: Any = wrapper.adapters[wrapper.active]
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
    steps: int = 24,
    lr: float = 5e-4,
    seed: int = 0,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Run the whole lifecycle, write everything under ``out_dir`` and return the summary (also in summary.json)."""
    import lorakit as lk
    from lorakit.models import smollm2_cache

    out_dir = Path(out_dir)
    s: dict[str, Any] = {"base": base, "out": str(out_dir)}
    was_cached = base != "smollm2-135m" or (smollm2_cache() / "config.json").is_file()
    out.rule("1. load the base model")
    t0 = time.perf_counter()
    with err.status(f"loading {base}" + ("" if was_cached else " (first time: de-quantising the GGUF into the cache)")):
        model, tok = lk.load_base(base)
    s["load_s" if was_cached else "first_load_s"] = time.perf_counter() - t0
    chat = bool(getattr(tok, "chat_template", None))
    s["total_params"] = sum(p.numel() for p in model.parameters())

    out.rule("2. the base model answers")
    before = _answers(model, tok, chat, max_new_tokens)
    for q, a in before.items():
        out.print(_qa(q, a))

    out.rule(f"3. attach LoRA (r=8, alpha=16, all-linear) and teach it {len(FACTS)} made-up facts")
    torch.manual_seed(seed)
    lk.attach(model, lk.method_config("lora", r=8, alpha=16), targets="all-linear")
    s["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s["adapted_modules"] = len(_delta_norms(model))
    batch = _batch(tok, chat)
    s["loss_before"] = _loss(model, batch)
    t0 = time.perf_counter()
    losses = _teach(model, batch, steps, lr)
    s["train_s"], s["steps"], s["loss_after"] = time.perf_counter() - t0, steps, _loss(model, batch)
    loss_change = f"{s['loss_before']:.3f} -> {s['loss_after']:.4f}"
    out.print(f"loss on the answers: {loss_change} in {steps} AdamW steps ({s['train_s']:.0f} s)")

    out.rule("4. the adapted model answers")
    after = _answers(model, tok, chat, max_new_tokens)
    for q, a in after.items():
        out.print(_qa(q, a, ("(changed)", "yellow") if a != before[q] else ("(same)", "dim")))
    s["answers"] = [{"prompt": q, "before": before[q], "after": after[q]} for q in before]
    s["facts_recalled"] = sum(a.lower().rstrip(".") in after[q].lower() for q, a in FACTS)
    s["answers_changed"] = sum(after[q] != before[q] for q in before)

    out.rule("5. save, reload onto a fresh base, merge")
    adapter_dir = lk.save_adapter(model, out_dir / "adapters" / "facts")
    s["adapter_dir"] = str(adapter_dir)
    s["adapter_bytes"] = sum(f.stat().st_size for f in adapter_dir.iterdir())
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

    plot = out_dir / "plots" / "training.png"
    _plot(losses, _delta_norms(model), plot)
    s["plot"], s["losses"] = str(plot), losses
    s["ok"] = s["reload_max_abs_diff"] <= RELOAD_TOL and s["merge_max_abs_diff"] <= MERGE_TOL and s["merged_is_plain"]
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
    t.add_row(
        "loss on answers", f"{s['loss_before']:.3f} -> {s['loss_after']:.4f} ({s['steps']} steps, {s['train_s']:.1f} s)"
    )
    t.add_row(
        "made-up facts recalled",
        f"{s['facts_recalled']}/{len(FACTS)} ({s['answers_changed']} of {len(s['answers'])} answers changed)",
    )
    for a in s["answers"]:
        t.add_row(Text(a["prompt"]), Text(f"before: {a['before']}\nafter:  {a['after']}"))
    t.add_row("adapter effect on logits", f"max |Δ| = {s['adapter_effect_max_abs']:.3g}")
    t.add_row("reloaded vs trained logits", f"max |Δ| = {s['reload_max_abs_diff']:.3g} (tolerance {RELOAD_TOL:g})")
    t.add_row("merged vs unmerged logits", f"max |Δ| = {s['merge_max_abs_diff']:.3g} (tolerance {MERGE_TOL:g})")
    t.add_row("adapter", Text(f"{s['adapter_dir']} ({human_bytes(s['adapter_bytes'])})"))
    t.add_row("plot", Text(s["plot"]))
    t.add_row("summary", Text(str(Path(s["out"]) / "summary.json")))
    t.add_row("checks", "[green]all passed[/]" if s["ok"] else "[red]FAILED[/]")
    return t


@friendly_errors
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the adapter, plot and summary.json.")
    ] = DEFAULT_OUT,
    base: Annotated[str, typer.Option(help="Base model: bundled name or local checkpoint dir.")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(min=1, help="AdamW steps used to teach the adapter.")] = 24,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 5e-4,
    threads: Annotated[int, typer.Option(min=1, help=THREADS_HELP)] = 1,
) -> None:
    """Run the adapter lifecycle on SmolLM2: answer, attach LoRA, teach it, save, reload, merge, plot, summarise."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    s = run_demo(out_dir, base=base, steps=steps, lr=lr)
    out.print(_summary_table(s))
    out.print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    if not s["ok"]:
        raise typer.Exit(1)
