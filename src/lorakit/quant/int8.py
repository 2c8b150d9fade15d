"""LLM.int8() weights through bitsandbytes (https://arxiv.org/abs/2208.07339): each output row stored as int8
with one absmax scale, w ≈ absmax_row / 127 · q (no outlier columns: threshold 0)."""

from __future__ import annotations

from torch import nn

from lorakit.quant._api import register_quant
from lorakit.quant._bnb import linear8bit


@register_quant("int8", bits=8, backend="bitsandbytes", description="8-bit rows with per-row absmax (LLM.int8)")
def int8(layer: nn.Linear) -> nn.Module:
    return linear8bit(layer)
