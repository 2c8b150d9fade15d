"""PEFT-format adapter I/O (atomic writes, checked reads).

The names below load ``io.adapter`` on first use (PEP 562), so ``lorakit.io.atomic`` and
``lorakit.io.stream`` import without the method registry or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.io.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_config, save_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_adapter", "read_config", "save_adapter"]


def __getattr__(name: str) -> Any:
    """The ``io.adapter`` name on first access, kept here afterwards."""
    if name not in __all__:
        raise AttributeError(f"module 'lorakit.io' has no attribute {name!r}")
    value = getattr(importlib.import_module("lorakit.io.adapter"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
