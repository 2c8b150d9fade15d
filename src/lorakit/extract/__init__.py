"""Adapters from full fine-tunes (PHLoRA, streaming) and re-factoring adapters to a lower rank.

The names below load on first use (PEP 562), so ``lorakit.extract.report`` imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.extract.checkpoint import Checkpoint
    from lorakit.extract.lowrank import RankRule
    from lorakit.extract.phlora import ExtractResult, extract
    from lorakit.extract.subnet import extract_subnet

_LAZY = {
    "Checkpoint": "lorakit.extract.checkpoint",
    "RankRule": "lorakit.extract.lowrank",
    "ExtractResult": "lorakit.extract.phlora",
    "extract": "lorakit.extract.phlora",
    "extract_subnet": "lorakit.extract.subnet",
}
__all__ = ["Checkpoint", "ExtractResult", "RankRule", "extract", "extract_subnet"]


def __getattr__(name: str) -> Any:
    """The named class or function, imported on first access and kept here."""
    if name not in _LAZY:
        raise AttributeError(f"module 'lorakit.extract' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
