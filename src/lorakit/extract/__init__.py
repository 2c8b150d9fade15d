"""Adapters from full fine-tunes (PHLoRA, streaming) and re-factoring adapters to a lower rank."""

from lorakit.extract.checkpoint import Checkpoint
from lorakit.extract.lowrank import RankRule
from lorakit.extract.phlora import ExtractResult, extract

__all__ = ["Checkpoint", "ExtractResult", "RankRule", "extract"]
