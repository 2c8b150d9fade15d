"""`lorakit extract` (PHLoRA: an adapter from a full fine-tune) and `lorakit resize` (re-factor an adapter)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorakit.cli._common import err, friendly_errors
from lorakit.cli._common import out as console

Opt = typer.Option
# Measured on 2 cores (SmolLM2, rank 16): the SVDs of 576×1536 deltas gain nothing from a second
# intra-op thread, whose core the read/write threads and the plot's helper use (3.2 s vs 3.75 s
# idle; 3.3 s vs 20-70 s with other jobs running, where spinning OpenMP threads wait on each other).
THREADS_HELP = "torch threads for the SVDs (reads, writes and the plot run beside them). Raise it for 7B-size layers."


def _targets(value: str) -> str | list[str]:
    """'all-linear', a regex (contains regex characters) or comma-separated name suffixes."""
    if value == "all-linear" or any(c in value for c in "()[]|*+?^$\\"):
        return value
    return [t.strip() for t in value.split(",") if t.strip()]


@friendly_errors
def extract(
    base: Annotated[str, Opt(help="Base model: a bundled name (smollm2-135m) or a checkpoint dir.")],
    tuned: Annotated[Path, Opt(help="The full fine-tune of BASE: a checkpoint dir with *.safetensors.")],
    out: Annotated[Path, Opt(help="Adapter dir to write (PEFT LoRA format); must not exist unless --overwrite.")],
    rank: Annotated[int | None, Opt(min=1, help="Keep this rank per module (default 16 if no rule is given).")] = None,
    energy: Annotated[
        float | None, Opt(help="Keep the smallest rank reaching this fraction of Σσ² per module, e.g. 0.9.")
    ] = None,
    ratio: Annotated[float | None, Opt(help="Rank as a fraction of each module's full rank.")] = None,
    max_rank: Annotated[int | None, Opt(min=1, help="Cap on the rank (with --energy/--ratio).")] = None,
    targets: Annotated[
        str, Opt(help="'all-linear', comma-separated name suffixes, or a regex of full module names.")
    ] = "all-linear",
    svd: Annotated[str, Opt(help="auto | exact | randomized (auto: randomized when the rank is small).")] = "auto",
    dtype: Annotated[str | None, Opt(help="float32 | bfloat16 | float16 (default: as stored).")] = None,
    embeddings: Annotated[
        str, Opt(help="Changed embeddings: 'full' (saved whole, modules_to_save) or 'lora' (factored too).")
    ] = "full",
    overwrite: Annotated[bool, Opt(help="Replace an existing adapter dir at --out.")] = False,
    seed: Annotated[int, Opt(help="Seed of the randomized SVD.")] = 0,
    threads: Annotated[int, Opt(min=1, help=THREADS_HELP)] = 1,
) -> None:
    """Extract TUNED − BASE as a LoRA adapter (PHLoRA), streaming tensor by tensor.

    Writes OUT/adapter_config.json + adapter_model.safetensors (loads in lorakit and PEFT),
    OUT/extract_report.json (per module: rank, energy kept, relative error) and
    OUT/extract_energy.png. Changed norms/embeddings/heads are saved whole and listed.
    """
    from lorakit.extract import report

    report.prestart()  # the plot's helper process loads matplotlib while this one loads torch
    import torch

    from lorakit.extract import extract as run

    torch.set_num_threads(threads)
    result = run(
        base,
        tuned,
        out,
        rank=rank,
        energy=energy,
        ratio=ratio,
        max_rank=max_rank,
        targets=_targets(targets),
        svd=svd,
        dtype=dtype,
        embeddings=embeddings,
        overwrite=overwrite,
        seed=seed,
    )
    s = result.to_json()["summary"]
    table = Table(title=f"extracted {out}", show_header=True)
    for col in ("LoRA modules", "rank (min/median/max)", "mean energy", "mean / max rel. error", "saved whole"):
        table.add_column(col)
    ranks = [m["rank"] for m in result.modules.values()] or [0]
    table.add_row(
        str(s["lora_modules"]),
        f"{min(ranks)} / {statistics.median(ranks):g} / {max(ranks)}",
        f"{s['mean_energy']:.4f}",
        f"{s['mean_rel_error']:.4f} / {s['max_rel_error']:.4f}",
        str(s["saved_modules"]),
    )
    console.print(table)
    for module, why in result.saved.items():
        err.print(f"saved whole: {module} ({why})")
    err.print(f"done in {result.seconds:.1f} s; report: {Path(result.path) / 'extract_report.json'}")


@friendly_errors
def resize(
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter dir (PEFT or lorakit format).")],
    out: Annotated[Path, Opt(help="Where to write the re-factored adapter (a new dir).")],
    rank: Annotated[int | None, Opt(min=1, help="New rank per module.")] = None,
    energy: Annotated[float | None, Opt(help="Smallest rank keeping this fraction of Σσ² per module.")] = None,
    max_rank: Annotated[int | None, Opt(min=1, help="Cap on the rank (with --energy).")] = None,
    nested: Annotated[
        bool, Opt("--nested", help="Keep the first --rank components instead (a DyLoRA-trained adapter's rank).")
    ] = False,
) -> None:
    """Re-factor ADAPTER to a lower rank by an exact SVD of B·A (QR of the factors, then an r×r SVD);
    with --nested, keep its first R components as a standard rank-R LoRA (the rank-R model of a DyLoRA run)."""
    from lorakit.errors import ConfigError
    from lorakit.extract.resize import resize as run

    if nested:
        from lorakit.train.callbacks.dylora import truncate

        if rank is None or energy is not None or max_rank is not None:
            raise ConfigError("--nested takes --rank R alone (the first R components), not --energy or --max-rank.")
        console.print(f"kept the first {rank} components of every module; wrote {truncate(adapter, rank, out)}")
        return
    if rank is None and energy is None and max_rank is None:
        raise ConfigError("give --rank R or --energy E (optionally with --max-rank).")
    report = run(adapter, out, rank=rank, energy=energy, max_rank=max_rank)
    before = sum(m["from"] for m in report.values())
    after = sum(m["rank"] for m in report.values())
    worst = max((m["rel_error"] for m in report.values()), default=0.0)
    console.print(
        f"{len(report)} modules: total rank {before} -> {after}; worst relative error {worst:.4f}; wrote {out}"
    )
