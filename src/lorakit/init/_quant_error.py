"""The quantization error of one layer, for methods whose init reads it (QWHA): E = W − Q(W).

Methods never import a quantization backend; this init-side helper quantizes a float32 copy of the layer's
(out, in) weight with the registered kind's own quantizer (``lk.quantize``'s ``kind``) and reads it back
through its base-layer kind, so Q(W) is exactly what ``lk.quantize(model, kind)`` will store.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import layers as L
from lorakit.quant import dense_linear, get_quant


def quantization_error(base: nn.Module, kind: str) -> torch.Tensor:
    """E = W − Q(W) (out, in, float32) of the full-precision layer ``base`` (only read) under the kind ``kind``."""
    W = L.weight_out_in(base).detach().float()  # (out, in)
    quantized = get_quant(kind).fn(dense_linear(W, None))
    return W - L.weight_out_in(quantized).detach().float().to(W.device)  # (out, in)
