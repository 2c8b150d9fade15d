"""torch.nn.Linear: weight (out, in), y = x·Wᵀ + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers._api import linear_forward_with, register_kind


@register_kind
class Linear:
    name = "linear"
    family = "linear"
    types: tuple[type[nn.Module] | str, ...] = (nn.Linear,)
    quantized = False
    forward_with = staticmethod(linear_forward_with)

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return int(base.in_features), int(base.out_features)  # type: ignore[arg-type]

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        return base.weight  # type: ignore[return-value]

    @staticmethod
    def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta

    @staticmethod
    def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(A.dtype), A)  # (..., r)

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, base.weight)  # type: ignore[arg-type]

    @staticmethod
    def base_bias(base: nn.Module) -> torch.Tensor | None:
        return base.bias  # type: ignore[return-value]
