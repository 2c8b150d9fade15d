"""lorakit's pure-torch integer group-quantized Linear (``lorakit.quant.intgroup``: int4g, int3g, int2g, ...).

Read as a Linear (family "linear"): ``weight_out_in`` is Ŵ = s·(q − z) (a new float tensor, not a view), the
base forward is x·Ŵᵀ, and nothing is written into the codes (``quantized``). The class is named by its module
path, so this layer package imports nothing of ``lorakit.quant``.

The quantizer's pure math lives here too (``group_quantize`` / ``group_dequantize``: no storage, no backend), so
that the quantization kind and a method that simulates it (``ofa_quant``) compute the same Ŵ bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers._api import register_kind
from lorakit.layers.linear import Linear


@register_kind
class IntGroup(Linear):  # dims, project_in, base_bias and forward_with are Linear's
    name = "intgroup"
    family = "linear"
    types = ("lorakit.quant.intgroup:IntGroupLinear",)
    quantized = True

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        return base.dequantized().detach()  # type: ignore[operator]  # (out, in)

    @staticmethod
    def forward_dtype(base: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
        return x_dtype  # IntGroupLinear's forward: F.linear(x, Ŵ.to(x.dtype), bias)

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, base.dequantized().to(x.dtype))  # type: ignore[operator]


def group_quantize(W: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out, G·g) uint8, scales (out, G), zeros (out, G)) of W (out, in), float32 math.

    Semantics: per row and group of ``group_size`` inputs (zero-padded to whole groups), asymmetric min-max with 0
    kept in range: s = (max − min) / (2^b − 1), z = round(−min / s), q = clamp(round(w / s) + z, 0, 2^b − 1)."""
    W = W.detach().float()  # (out, in)
    out_f, in_f = W.shape
    pad = -in_f % group_size
    Wg = F.pad(W, (0, pad)).view(out_f, -1, group_size)  # (out, G, g); padding zeros are already in range
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)  # (out, G)
    flat = lo == hi  # an all-zero group: GPTQ's [-1, 1]
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    maxq = (1 << bits) - 1
    s = (hi - lo) / maxq  # (out, G)
    z = torch.round(-lo / s)  # (out, G)
    codes = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, maxq).to(torch.uint8)  # (out, G, g)
    return codes.flatten(1), s, z


def group_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int) -> torch.Tensor:
    """Ŵ = s · (q − z), (out, in), in the scales' dtype; codes (out, G·g), scales and zeros (out, G)."""
    g = codes.shape[1] // scales.shape[1]
    s = scales.repeat_interleave(g, dim=1)  # (out, G·g)
    z = zeros.repeat_interleave(g, dim=1)  # (out, G·g)
    return ((codes.to(s.dtype) - z) * s)[:, :in_features]
