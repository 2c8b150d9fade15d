"""DoRA: Weight-Decomposed Low-Rank Adaptation — https://arxiv.org/abs/2402.09353
Update rule: W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_row, with m initialised to ‖W₀‖_row.

In (out, in) orientation the norm runs over each output row (PEFT's convention for Linear,
Conv1D and Embedding alike). As the paper's §4.3 suggests, the norm is treated as a constant
in the backward pass (detached); the forward value is exact, so merging is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import factorize
from lorakit.methods._api import LoraFactors, register, require
from lorakit.methods.lowrank.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class DoraConfig(LoraConfig):
    """Same options as LoRA (but lora_bias); the magnitude vector is added automatically."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(not self.lora_bias, "DoRA does not support lora_bias; set lora_bias=False.")


@register(
    "dora",
    config=DoraConfig,
    paper="DoRA: Weight-Decomposed Low-Rank Adaptation",
    url="https://arxiv.org/abs/2402.09353",
    family="F1",
    params="r*(d_in+d_out)+d_out",
)
class Dora(Lora):
    """x ↦ g ⊙ (W₀x + s·B·A·x) + b with g = m / ‖W₀ + s·B·A‖_row (detached norm)."""

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> None:
        return None  # LoRA's fused training node does not apply: the gain g rescales the base output

    def __init__(self, cfg: LoraConfig, in_features: int, out_features: int, kind: str, weight: torch.Tensor):
        super().__init__(cfg, in_features, out_features, kind, weight)
        self.m = nn.Parameter(torch.ones(out_features, dtype=self.A.dtype, device=self.A.device))  # (out,)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> Dora:
        adapter: Any = super().from_base(base, cfg)
        with torch.no_grad():
            adapter.m.copy_(adapter.row_norm(base))  # identity at init: g = 1
        return adapter

    def row_norm(self, base: nn.Module) -> torch.Tensor:
        """‖W₀ + s·B·A‖ over each output row, shape (out,), detached."""
        W = L.weight_out_in(base).detach()  # (out, in)
        BA = (self.B @ self.A).detach().to(W.dtype)  # (out, in)
        return torch.linalg.vector_norm(W + self.scale * BA, dim=1)  # (out,)

    def gain(self, base: nn.Module) -> torch.Tensor:
        return self.m / self.row_norm(base).to(self.m.dtype)  # (out,)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        g = self.gain(base).to(y.dtype)  # (out,)
        if self.kind == "embedding":
            base_out = y  # an embedding has no bias
        elif self.training and not isinstance(self.dropout, nn.Identity):
            base_out = L.base_linear(base, self.dropout(x))  # PEFT rescales W·dropout(x) in training
        else:
            bias = L.base_bias(base)
            base_out = y if bias is None else y - bias  # (..., out)
        return y + (g - 1) * base_out + g * self.lora_out(x, base).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        W = L.weight_out_in(base)  # (out, in)
        V = W + self.scale * (self.B @ self.A).to(W.dtype)  # (out, in)
        merged = V * self.gain(base).to(W.dtype)[:, None]  # (out, in)
        return L.to_base_layout(base, merged - W)

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Approximate: the best rank-(``rank`` or 2r) factorisation of the exact merged delta.

        DoRA's delta g⊙(W₀+sBA) − W₀ = (g−1)⊙W₀ + g⊙sBA is full rank in general; the SVD keeps
        the most energy a plain LoRA of that rank can hold.
        """
        with torch.no_grad():
            delta = L.to_base_layout(base, self.delta_weight(base))  # back to (out, in)
            return factorize(delta, rank or 2 * self.config.r)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {**super().export_state(), "lora_magnitude_vector": self.m}

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        return {**Lora.peft_fields(cfg), "use_dora": True}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> DoraConfig | None:
        if fields.get("peft_type") != "LORA" or not fields.get("use_dora"):
            return None
        return DoraConfig(**Lora.lora_kwargs_from_peft(fields))
