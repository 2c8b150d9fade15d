"""`lorakit export`: write adapters as plain-LoRA PEFT dirs another engine loads (vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorakit.cli._common import err, friendly_errors, out
from lorakit.errors import ConfigError

Opt = typer.Option


@friendly_errors
def export(
    adapters: Annotated[list[Path], typer.Argument(help="Adapter dirs (any method) and/or compressed collections.")],
    out_dir: Annotated[Path, Opt("--out", help="Folder to write; each adapter goes to OUT/<name>.")],
    fmt: Annotated[str, Opt("--format", help="Target engine: vllm.")] = "vllm",
    base: Annotated[
        str | None, Opt(help="Base for converting non-LoRA methods (default: each adapter's own base).")
    ] = None,
    rank: Annotated[
        int | None, Opt(min=1, help="Rank of the LoRA made by to_lora (DoRA default 2r); truncates LoRAs too.")
    ] = None,
    drop_saved: Annotated[
        bool, Opt("--drop-saved", help="Drop modules_to_save (vLLM refuses them) instead of stopping.")
    ] = False,
) -> None:
    """Export adapters as vLLM-ready plain-LoRA dirs: OUT/<name>/adapter_config.json + safetensors.

    lorakit export --format vllm ADAPTER... --out DIR [--base NAME|DIR]

    Plain LoRAs are normalised (scale folded into B); DoRA, VeRA and every other method are
    converted through their to_lora on the base; a collection gives one dir per adapter in it.
    Prints the `vllm serve ... --enable-lora --lora-modules ...` line to serve them.
    """
    from lorakit.io.export import FORMATS, export_vllm

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}.")
    report = export_vllm(adapters, out_dir, base=base, rank=rank, drop_saved=drop_saved)
    for warning in report.warnings:
        err.print(f"warning: {warning}", style="yellow", soft_wrap=True, markup=False)
    for name, path in report.adapters.items():
        out.print(f"{name} ({report.methods[name]}) -> {path}", soft_wrap=True, markup=False)
    out.print(f"exported {len(report.adapters)} adapter(s); max rank {report.max_rank}. Serve them with:")
    out.print(report.command(), soft_wrap=True, markup=False)
