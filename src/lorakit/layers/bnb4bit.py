"""bitsandbytes' 4-bit Linear (NF4, FP4): W stored as packed 4-bit codes + one absmax per block of 64.

Read as a Linear (family "linear"): ``weight_out_in`` dequantizes (a new float tensor, not a view), the
base forward runs through bitsandbytes, and nothing is written into the weight (``quantized``). bitsandbytes
is imported only by whoever built the layer; this file imports it inside the readers.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from lorakit.layers._api import register_kind
from lorakit.layers.linear import Linear


@register_kind
class Bnb4bit(Linear):  # dims, project_in, base_bias and forward_with are Linear's
    name = "bnb4bit"
    family = "linear"
    types = ("bitsandbytes.nn.modules:Linear4bit",)
    quantized = True

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        bnbf = importlib.import_module("bitsandbytes.functional")
        weight: Any = base.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes repacked it for its AVX512 kernel
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
        return bnbf.dequantize_4bit(data, state).detach()  # (out, in)

    @staticmethod
    def forward_dtype(base: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
        """bitsandbytes' 4-bit forward is x·Ŵᵀ in the compute dtype (the input's when none is set)."""
        return getattr(base, "compute_dtype", None) or x_dtype

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x·Ŵᵀ through bitsandbytes, computed in the layer's compute dtype, returned in x's dtype."""
        bnb = importlib.import_module("bitsandbytes")
        weight: Any = base.weight  # bitsandbytes' Params4bit: packed codes, with its QuantState
        compute: torch.dtype = getattr(base, "compute_dtype", None) or x.dtype
        return bnb.matmul_4bit(x.to(compute), weight, quant_state=weight.quant_state).to(x.dtype)

    @staticmethod
    def requantize(base: nn.Module, W: torch.Tensor) -> None:
        """W quantized again as a fresh Params4bit with this layer's quant type, block size and dtype (on the CPU,
        then moved to the layer's device, which quantizes it, as lorakit.quant builds its layers)."""
        bnb = importlib.import_module("bitsandbytes")
        old: Any = base.weight
        params = bnb.nn.Params4bit(
            W.to(old.quant_state.dtype).cpu(), requires_grad=False, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, blocksize=old.blocksize,
        )  # fmt: skip
        base.weight = params.to(old.device)
