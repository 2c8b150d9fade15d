"""NF4 (QLoRA's 4-bit NormalFloat, https://arxiv.org/abs/2305.14314) through bitsandbytes: per block of 64
weights, w ≈ absmax · q with q on the 16 normal quantiles of nf4's grid."""

from __future__ import annotations

from torch import nn

from lorakit.quant._api import register_quant
from lorakit.quant._bnb import linear4bit


@register_quant("nf4", bits=4, backend="bitsandbytes", description="4-bit NormalFloat, block 64 (QLoRA)")
def nf4(layer: nn.Linear) -> nn.Module:
    return linear4bit(layer, "nf4")
