"""The two files of an adapter directory, read with errors that name the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import torch

from lorakit.errors import AdapterFormatError
from lorakit.io.peft_format import CONFIG_NAME, WEIGHTS_NAME


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed adapter_config.json of an adapter dir, with errors that name the file."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter directory {path} does not exist (expected a folder with {CONFIG_NAME}).")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFormatError(f"{path} has no {CONFIG_NAME}; is it an adapter directory (PEFT or lorakit format)?")
    try:
        fields = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_file} is not valid JSON ({e}); re-save the adapter.") from e
    if not isinstance(fields, dict):
        raise AdapterFormatError(f"{cfg_file} must hold a JSON object, found {type(fields).__name__}.")
    return fields


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, lorakit metadata block or {}) of an adapter weights file."""
    if not file.is_file():
        raise AdapterFormatError(f"{file} is missing; the adapter directory needs {WEIGHTS_NAME}.")
    try:
        with safetensors.safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
            raw = (f.metadata() or {}).get("lorakit")
        return tensors, (json.loads(raw) if raw else {})
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(
            f"{file} is not a readable safetensors file ({e}); it is probably truncated or corrupt: "
            "re-save or re-copy it."
        ) from e
