"""FP4 through bitsandbytes: per block of 64 weights, w ≈ absmax · q with q a 4-bit float (1 sign, 2 exponent,
1 mantissa bit), scaled to [-1, 1]."""

from __future__ import annotations

from torch import nn

from lorakit.quant._api import register_quant
from lorakit.quant._bnb import linear4bit


@register_quant("fp4", bits=4, backend="bitsandbytes", description="4-bit float (e2m1), block 64")
def fp4(layer: nn.Linear) -> nn.Module:
    return linear4bit(layer, "fp4")
