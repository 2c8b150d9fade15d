"""Integer group-wise quantization (GPTQ / AWQ storage), pure torch: ``int4g`` and its 2/3/8-bit kin.

Semantics: the input dimension of W (out, in) is cut into groups of ``g`` columns, G(j) = j // g (a last
group may be shorter); per row and group, asymmetric uniform min-max with 0 kept in range (GPTQ's
quantizer): s = (max − min) / (2^b − 1), z = round(−min / s), q = clamp(round(w / s) + z, 0, 2^b − 1),
and Ŵ[o, j] = s[o, G(j)] · (q[o, j] − z[o, G(j)]). Codes are packed 8 // b to a byte (3 bits: one per byte).

The zero points are stored as floats, so an update that is constant over each group is absorbed exactly:
Ŵ + ΔW = s · (q − z') with z' = z − ΔW_group / s and the codes q untouched (``absorb_zero_points``, the
kind's ``absorb`` hook, which ``lk.merge`` tries before re-quantizing). QA-LoRA's ΔW has that form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers.intgroup import group_dequantize, group_quantize
from lorakit.quant._api import register_quant


class IntGroupLinear(nn.Module):
    """y = x·Ŵᵀ + b with Ŵ dequantized from ``weight`` (packed uint8 codes), ``scales`` and ``zeros`` (out, G).

    A reference layer, not a fast kernel: the forward unpacks and dequantizes W at every call."""

    scales: torch.Tensor  # (out, G) buffer
    zeros: torch.Tensor  # (out, G) buffer

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, kind: str) -> None:
        super().__init__()
        if bits not in (2, 3, 4, 8) or group_size < 1 or group_size % (8 // bits if 8 % bits == 0 else 1):
            raise ConfigError(
                f"int group quantization needs bits in 2|3|4|8 and a group size that holds whole bytes of codes, "
                f"got bits={bits}, group_size={group_size}."
            )
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.quant_kind = kind  # the registered kind that made it: re-quantizing a merge uses the same one
        groups = -(-in_features // group_size)
        per = self.per_byte
        packed = torch.zeros(out_features, groups * group_size // per, dtype=torch.uint8)  # (out, G·g / per)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("scales", torch.ones(out_features, groups))  # (out, G)
        self.register_buffer("zeros", torch.zeros(out_features, groups))  # (out, G), float: merges shift them
        self.bias: nn.Parameter | None = None

    @property
    def per_byte(self) -> int:
        return 8 // self.bits if 8 % self.bits == 0 else 1

    def codes(self) -> torch.Tensor:
        """The integer codes q, (out, G·g), uint8."""
        shifts = torch.arange(self.per_byte, device=self.weight.device, dtype=torch.uint8) * self.bits
        mask = (1 << self.bits) - 1
        return ((self.weight[..., None] >> shifts) & mask).flatten(-2)  # (out, G·g / per, per) -> (out, G·g)

    def dequantized(self) -> torch.Tensor:
        """Ŵ = s · (q − z), (out, in), in the scales' dtype."""
        return group_dequantize(self.codes(), self.scales, self.zeros, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, bias={self.bias is not None}"  # fmt: skip


def quantize_linear(layer: nn.Linear, *, bits: int = 4, group_size: int = 32, kind: str = "int4g") -> IntGroupLinear:
    """``layer`` quantized group-wise (the module docstring's semantics), bias kept in full precision."""
    W = layer.weight.detach().float()  # (out, in)
    out_f, in_f = W.shape
    q = IntGroupLinear(in_f, out_f, bits=bits, group_size=group_size, kind=kind).to(W.device)
    codes, s, z = group_quantize(W, bits, group_size)  # (out, G·g), (out, G), (out, G)
    codes = codes.view(out_f, -1, q.per_byte)  # (out, G·g / per, per)
    shifts = torch.arange(q.per_byte, device=W.device, dtype=torch.uint8) * bits
    q.weight.data = (codes << shifts).sum(-1, dtype=torch.uint8)  # distinct bit fields: sum = OR
    q.scales.copy_(s)
    q.zeros.copy_(z)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return q


def absorb_zero_points(layer: nn.Module, delta: torch.Tensor, delta_bias: torch.Tensor | None) -> nn.Module | None:
    """``layer`` holding Ŵ + delta exactly, when the (out, in) ``delta`` is constant over every quantization
    group of every row: a copy with z' = z − delta_group / s (codes and scales bit-identical); else None."""
    assert isinstance(layer, IntGroupLinear)
    g = layer.group_size
    per_group = delta[:, ::g].float()  # (out, G): each group's first column
    if not torch.equal(per_group.repeat_interleave(g, dim=1)[:, : layer.in_features], delta.float()):
        return None
    merged = IntGroupLinear(layer.in_features, layer.out_features, bits=layer.bits, group_size=g, kind=layer.quant_kind)
    merged = merged.to(layer.scales.device)
    merged.weight.data = layer.weight.detach().clone()
    merged.scales = layer.scales.detach().clone()
    merged.zeros = (layer.zeros.float() - per_group / layer.scales.float()).to(layer.zeros.dtype)
    bias, dtype = layer.bias, layer.scales.dtype if layer.bias is None else layer.bias.dtype
    if delta_bias is not None:
        bias = delta_bias.detach().float() + (0 if bias is None else bias.detach().float())  # type: ignore[assignment]
    if bias is not None:
        merged.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    return merged.train(layer.training)


def _described(bits: int, group_size: int) -> str:
    return f"{bits}-bit integer, asymmetric min-max per group of {group_size} inputs (GPTQ layout)"


@register_quant("int4g", bits=4, backend="torch", description=_described(4, 32), absorb=absorb_zero_points)
def int4g(layer: nn.Linear) -> nn.Module:
    return quantize_linear(layer, bits=4, group_size=32, kind="int4g")


@register_quant("int4g128", bits=4, backend="torch", description=_described(4, 128), absorb=absorb_zero_points)
def int4g128(layer: nn.Linear) -> nn.Module:
    return quantize_linear(layer, bits=4, group_size=128, kind="int4g128")


@register_quant("int3g", bits=3, backend="torch", description=_described(3, 32), absorb=absorb_zero_points)
def int3g(layer: nn.Linear) -> nn.Module:
    return quantize_linear(layer, bits=3, group_size=32, kind="int3g")


@register_quant("int2g", bits=2, backend="torch", description=_described(2, 32), absorb=absorb_zero_points)
def int2g(layer: nn.Linear) -> nn.Module:
    return quantize_linear(layer, bits=2, group_size=32, kind="int2g")
