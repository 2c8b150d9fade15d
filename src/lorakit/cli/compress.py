"""`lorakit compress`: jointly compress LoRA adapters of one base into a collection (Compress then Serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lorakit.cli._common import err, friendly_errors, human_bytes, out

Opt = typer.Option


@friendly_errors
def compress(
    adapters: Annotated[list[Path], typer.Argument(help="Plain LoRA adapter dirs of one base (at least 2).")],
    out_dir: Annotated[Path, Opt("--out", help="Collection dir to write (collection.json + collection.safetensors).")],
    rank: Annotated[int, Opt(help="Shared rank R of every module's basis U (d_out, R), V (d_in, R).")],
    iters: Annotated[int, Opt(min=0, help="Rounds of alternating refinement of U and V (never raise the error).")] = 0,
    names: Annotated[
        str | None, Opt(help="Comma-separated adapter names, one per dir (default: the dirs' names).")
    ] = None,
    overwrite: Annotated[bool, Opt(help="Replace an existing collection at --out.")] = False,
) -> None:
    """Fit a shared basis per module and a small per-adapter core: B_c·A_c ≈ U·Σ_c·Vᵀ.

    lorakit compress A B C --out COLL --rank 16 [--iters 2]

    Prints each adapter's error Σ‖ΔW − UΣVᵀ‖² / Σ‖ΔW‖² over its modules (0 when R reaches the
    adapters' total rank) and the stored size before and after. Non-LoRA adapters: run
    `lorakit export --format vllm` on them first.
    """
    from lorakit.compose.compress import compress as run

    listed = [n.strip() for n in names.split(",")] if names is not None else None
    err.print(f"compressing {len(adapters)} adapter(s) at rank {rank} ...")
    report = run(adapters, out_dir, rank=rank, iters=iters, names=listed, overwrite=overwrite, progress=True)
    table = Table(title=f"collection {out_dir} (rank {rank})", show_header=True)
    table.add_column("adapter")
    table.add_column("rel. error (energy lost)", justify="right")
    for name, error in report.errors.items():
        table.add_row(name, f"{error:.3e}")
    out.print(table)
    out.print(
        f"size: {human_bytes(report.bytes_before)} as {len(report.names)} adapters -> "
        f"{human_bytes(report.bytes_after)} as one collection ({report.ratio:.2f}x smaller); "
        f"mean error {sum(report.errors.values()) / len(report.errors):.3e}; wrote {report.path}",
        soft_wrap=True,
    )
