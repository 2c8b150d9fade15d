"""`lorakit analyze`: spectra, energy, effective/stable rank, intruder dimensions and overlaps of an adapter."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from lorakit.cli._common import err, friendly_errors, out
from lorakit.cli.demo import THREADS_HELP

Opt = typer.Option


@friendly_errors
def analyze(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter dir (any plain LoRA, lorakit or PEFT).")],
    base: Annotated[
        str | None, Opt(help="Base model (bundled name or local HF dir) for intruder dimensions; skipped without.")
    ] = None,
    tuned: Annotated[
        Path | None, Opt(help="Full fine-tuned checkpoint dir of the same base: its intruders are counted too.")
    ] = None,
    threshold: Annotated[
        float, Opt(help="ε: a top-k direction is an intruder if its max |cos| to W0's is below.")
    ] = 0.5,
    top_k: Annotated[int, Opt(help="How many top singular vectors of the fine-tuned weight to test.")] = 10,
    out_dir: Annotated[
        Path | None, Opt("--out", help="Where analysis.json and the PNG plots go (default: ADAPTER_DIR/analysis).")
    ] = None,
    compare: Annotated[
        list[Path] | None, Opt(help="Another adapter dir to measure overlap and interference with (repeatable).")
    ] = None,
    threads: Annotated[int, Opt(min=1, help=THREADS_HELP)] = 1,
) -> None:
    """Per module: rank, parameters, singular values, energy curve, effective and stable rank; with --base, intruder
    dimensions (arXiv:2410.21228); with --compare, subspace overlap and interference. Writes analysis.json and PNGs."""
    import torch

    from lorakit.analysis import analyze as run_analysis

    torch.set_num_threads(threads)
    start = time.perf_counter()
    report = run_analysis(adapter_dir, base, tuned, threshold=threshold, top_k=top_k, compare=compare or [])
    target = out_dir if out_dir is not None else adapter_dir / "analysis"
    report.save(target)
    out.print(Text(report.summary()), soft_wrap=True)
    err.print(f"analysis.json and plots in {target} ({time.perf_counter() - start:.1f} s)")
