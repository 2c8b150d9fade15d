"""`lorakit inspect`: what an adapter dir holds, read from its files alone (no base model)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import safetensors
import typer
from rich.table import Table

from lorakit.cli._common import friendly_errors, human_bytes, out
from lorakit.errors import AdapterFormatError, LorakitError
from lorakit.io.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, config_from_fields, read_config
from lorakit.io.peft_format import pattern_value, rank_pattern_of
from lorakit.methods._api import spec_of_config

RANK_KEYS = (
    "lora_A.weight",
    "lora_embedding_A",
    "lora_A",
)  # PEFT suffixes whose first dim is the rank (lora_A: AdaLoRA's Q)


def _header(file: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """({key: (shape, dtype)}, metadata) of a safetensors file, without reading the tensors."""
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing; the adapter directory needs {WEIGHTS_NAME}.")
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            entries = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
            return entries, dict(f.metadata() or {})
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(f"{file} is not a readable safetensors file ({e}); re-save or re-copy it.") from e


def _split(key: str, modules: list[str], tag: str) -> tuple[str, str]:
    """(module, suffix) of a tensor key: by the saved module list, else at the first ``<peft_type>_`` part."""
    name = key.removeprefix(PREFIX)
    for module in sorted(modules, key=len, reverse=True):
        if name.startswith(module + "."):
            return module, name[len(module) + 1 :]
    parts = name.split(".")
    cut = next((i for i, p in enumerate(parts) if p.startswith(tag)), len(parts) - 1)
    return ".".join(parts[:cut]), ".".join(parts[cut:])


def summarize(path: str | Path) -> dict[str, Any]:
    """Method, base, modules, ranks, parameter count, size and dtype of the adapter dir at ``path``."""
    path = Path(path)
    fields = read_config(path)
    entries, metadata = _header(path / WEIGHTS_NAME)
    block = fields.get("lorakit")
    if not isinstance(block, dict):
        try:
            block = json.loads(metadata.get("lorakit") or "{}")
        except json.JSONDecodeError as e:
            raise AdapterFormatError(f"{path / WEIGHTS_NAME}: its 'lorakit' metadata is not valid JSON ({e}).") from e
    method = block.get("method")
    if method is None:
        try:
            method = spec_of_config(config_from_fields(fields, path / CONFIG_NAME)).name
        except LorakitError:
            method = f"{fields.get('peft_type')} (not loadable by lorakit)"
    saved_cfg = block.get("config") or {}
    default_r = fields.get("r", saved_cfg.get("r"))
    tag = str(fields.get("peft_type") or "lora").lower() + "_"
    per_module: dict[str, dict[str, Any]] = {}
    for key, (shape, _) in sorted(entries.items(), key=lambda kv: _natural(kv[0])):
        module, suffix = _split(key, list(block.get("modules") or []), tag)
        row = per_module.setdefault(module, {"module": module, "rank": None, "params": 0})
        row["params"] += _numel(shape)
        if suffix in RANK_KEYS:
            row["rank"] = shape[0]
    for row in per_module.values():
        if row["rank"] is None:
            row["rank"] = pattern_value(rank_pattern_of(fields), row["module"]) or default_r
    ranks = Counter(row["rank"] for row in per_module.values())
    return {
        "path": str(path),
        "method": method,
        "peft_type": fields.get("peft_type"),
        "base_model": fields.get("base_model_name_or_path"),
        "config": saved_cfg
        or {k: fields[k] for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora") if k in fields},
        "target_modules": len(per_module),
        "ranks": {str(r): n for r, n in sorted(ranks.items(), key=lambda kv: (kv[0] is None, kv[0]))},
        "trainable_params": sum(row["params"] for row in per_module.values()),
        "tensors": len(entries),
        "dtypes": sorted({dtype for _, dtype in entries.values()}),
        "file_bytes": (path / WEIGHTS_NAME).stat().st_size + (path / CONFIG_NAME).stat().st_size,
        "modules": list(per_module.values()),
    }


def _natural(key: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@friendly_errors
def inspect(
    adapter_dir: Annotated[
        Path, typer.Argument(help="Adapter directory (adapter_config.json + adapter_model.safetensors).")
    ],
    all_modules: Annotated[
        bool, typer.Option("--all", help="Also list every adapted module with its rank and size.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON (always includes every module).")
    ] = False,
) -> None:
    """Summarise an adapter dir: method, base model, target modules, ranks, trainable parameters, size, dtype."""
    s = summarize(adapter_dir)
    if json_output:
        typer.echo(json.dumps(s, indent=2))
        return
    table = Table(title=f"Adapter {s['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("method", s["method"]),
        ("base model", str(s["base_model"])),
        ("config", ", ".join(f"{k}={v}" for k, v in s["config"].items())),
        ("target modules", str(s["target_modules"])),
        ("rank -> modules", ", ".join(f"r={r}: {n}" for r, n in s["ranks"].items())),
        ("trainable params", f"{s['trainable_params']:,}"),
        ("tensors", str(s["tensors"])),
        ("dtype", ", ".join(s["dtypes"])),
        ("file size", f"{human_bytes(s['file_bytes'])} ({s['file_bytes']:,} bytes)"),
    ]
    for field, value in rows:
        table.add_row(field, value)
    out.print(table)
    if all_modules:
        modules = Table(title="Adapted modules")
        modules.add_column("module", overflow="fold")
        modules.add_column("rank", justify="right")
        modules.add_column("params", justify="right")
        for row in s["modules"]:
            modules.add_row(row["module"], str(row["rank"]), f"{row['params']:,}")
        out.print(modules)
