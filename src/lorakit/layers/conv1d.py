"""transformers' GPT-2 Conv1D: a linear map whose weight is stored (in, out), y = x·W + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from lorakit.layers._api import linear_forward_with, register_kind


@register_kind
class Conv1D:
    name = "conv1d"
    family = "conv1d"
    types = (HFConv1D,)
    quantized = False
    forward_with = staticmethod(linear_forward_with)

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return int(base.weight.shape[0]), int(base.weight.shape[1])  # type: ignore[index]  # weight (in, out)

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return weight.T  # (out, in) view

    @staticmethod
    def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # (out, in) -> (in, out)

    @staticmethod
    def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(A.dtype), A)  # (..., r)

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return F.linear(x, weight.T)

    @staticmethod
    def base_bias(base: nn.Module) -> torch.Tensor | None:
        return base.bias  # type: ignore[return-value]
