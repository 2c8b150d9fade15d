"""bitsandbytes' 8-bit Linear (LLM.int8()): W stored as int8 rows CB with one absmax per row (SCB).

Read as a Linear (family "linear"): ``weight_out_in`` dequantizes (CB · SCB / 127, a new float tensor), the
base forward runs through bitsandbytes, and nothing is written into the weight (``quantized``).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from lorakit.layers._api import register_kind
from lorakit.layers.linear import Linear


@register_kind
class Bnb8bit(Linear):  # dims, project_in, base_bias and forward_with are Linear's
    name = "bnb8bit"
    family = "linear"
    types = ("bitsandbytes.nn.modules:Linear8bitLt",)
    quantized = True

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        bnbf = importlib.import_module("bitsandbytes.functional")
        weight: Any = base.weight  # bitsandbytes' Int8Params: the int8 rows, with the row scales as .SCB
        state: Any = base.state
        scb = weight.SCB if weight.SCB is not None else state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scb).float()  # (out, in)

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x·Ŵᵀ through bitsandbytes (the layer's forward, its bias taken off again)."""
        y = base(x)
        bias = base.bias
        return y if bias is None else y - bias.to(y.dtype)

    @staticmethod
    def requantize(base: nn.Module, W: torch.Tensor) -> None:
        """W quantized again as fresh int8 rows with one absmax scale each (the layer's forward moves them into its
        state on the next call, as for a freshly built layer)."""
        bnb = importlib.import_module("bitsandbytes")
        old: Any = base.weight
        params = bnb.nn.Int8Params(W.float().cpu(), requires_grad=False, has_fp16_weights=False)
        base.weight = params.to(old.device)
        state: Any = base.state
        state.CB, state.SCB = None, None  # stale copies of the old rows
