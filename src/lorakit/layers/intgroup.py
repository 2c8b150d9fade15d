"""lorakit's pure-torch integer group-quantized Linear (``lorakit.quant.intgroup``: int4g, int3g, int2g, ...).

Read as a Linear (family "linear"): ``weight_out_in`` is Ŵ = s·(q − z) (a new float tensor, not a view), the
base forward is x·Ŵᵀ, and nothing is written into the codes (``quantized``). The class is named by its module
path, so this layer package imports nothing of ``lorakit.quant``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers._api import register_kind


@register_kind
class IntGroup:
    name = "intgroup"
    family = "linear"
    types = ("lorakit.quant.intgroup:IntGroupLinear",)
    quantized = True

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        return int(base.in_features), int(base.out_features)  # type: ignore[arg-type]

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        return base.dequantized().detach()  # type: ignore[operator]  # (out, in)

    @staticmethod
    def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta  # the dequantized weight's layout

    @staticmethod
    def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(A.dtype), A)  # (..., r)

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, base.dequantized().to(x.dtype))  # type: ignore[operator]

    @staticmethod
    def base_bias(base: nn.Module) -> torch.Tensor | None:
        return base.bias  # type: ignore[return-value]
