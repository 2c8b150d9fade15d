"""BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation — https://arxiv.org/abs/2412.06441
Update rule: D = m_out ⊙ V/‖V‖_row with V = W₀ + s·B·A (DoRA), then W' = D ⊙ m_in/‖D‖_col (the other dimension).

DoRA normalises only one dimension of W (per output, the norm PEFT and lorakit's DoRA use); BoRA
adds the symmetric step on the other one, with its own trained magnitude per input feature:
W' = diag(g_out)·V·diag(g_in), g_out = m_out/‖V‖_row, g_in = m_in/‖D‖_col. m_out starts at ‖W₀‖_row
and m_in at ‖W₀‖_col, so with B·A = 0 the model starts as the base. Both norms are detached in the
backward pass (DoRA's §4.3); forward values are exact, so merging is exact. With m_in equal to ‖D‖_col
(an input gain of 1) the layer is exactly DoRA. Trainable: LoRA's r·(d_in + d_out) plus d_out + d_in.
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
class BoraConfig(LoraConfig):
    """Same options as LoRA (but lora_bias); the two magnitude vectors are added automatically."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(not self.lora_bias, "BoRA does not support lora_bias; set lora_bias=False.")


def _gain(m: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / norm with a zero norm (an all-zero row or column, which stays zero) mapped to a zero gain."""
    return m / norm.detach().clamp_min(1e-12).to(m.dtype)


@register(
    "bora",
    config=BoraConfig,
    paper="BoRA: Bi-dimensional Weight-Decomposed Low-Rank Adaptation",
    url="https://arxiv.org/abs/2412.06441",
    family="F1",
    params="(r*d_out if train_only == 'B' else r*(d_in+d_out)) + d_out + d_in",
)
class Bora(Lora):
    """x ↦ g_out ⊙ (W₀ + s·B·A)(g_in ⊙ x) + b with g_out (out,), g_in (in,) from the two detached norms."""

    peft_type = None  # type: ignore[assignment]  # PEFT has no BoRA (LoRA's is "LORA")

    def __init__(self, cfg: LoraConfig, in_features: int, out_features: int, kind: str, weight: torch.Tensor):
        super().__init__(cfg, in_features, out_features, kind, weight)
        factory: dict[str, Any] = {"dtype": self.A.dtype, "device": self.A.device}
        self.m = nn.Parameter(torch.ones(out_features, **factory))  # (out,) per-output magnitude (DoRA's)
        self.m_in = nn.Parameter(torch.ones(in_features, **factory))  # (in,) per-input magnitude

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> Bora:
        adapter: Any = super().from_base(base, cfg)
        W = L.weight_out_in(base).detach().float()  # (out, in); B·A = 0 at init, so V = D = W₀
        with torch.no_grad():
            adapter.m.copy_(torch.linalg.vector_norm(W, dim=1))  # ‖W₀‖_row
            adapter.m_in.copy_(torch.linalg.vector_norm(W, dim=0))  # ‖W₀‖_col
        return adapter

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> None:
        return None  # LoRA's fused training node does not apply: both gains rescale the base path

    def gains(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_out (out,), g_in (in,)): g_out = m/‖V‖_row, g_in = m_in/‖g_out ⊙ V‖_col, norms detached."""
        W = L.weight_out_in(base).detach()  # (out, in)
        V = W + self.scale * (self.B @ self.A).detach().to(W.dtype)  # (out, in)
        g_out = _gain(self.m, torch.linalg.vector_norm(V, dim=1))  # (out,)
        D = V * g_out.detach().to(V.dtype)[:, None]  # (out, in), DoRA's weight
        return g_out, _gain(self.m_in, torch.linalg.vector_norm(D, dim=0))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        g_out, g_in = (g.to(y.dtype) for g in self.gains(base))
        if self.kind == "embedding":  # token t selects column t of W': scale it by g_in[t]
            return g_in[x][..., None] * g_out * (y + self.lora_out(x, base).to(y.dtype))
        xd = self.dropout(x)
        bias = L.base_bias(base)
        keep = (0 if bias is None else bias) if xd is x else y - L.base_linear(base, xd)  # y − W₀·xd
        xg = xd * g_in  # (..., in)
        h = L.project_in(base, xg, self.A)  # (..., r); the dropout already ran on xd
        adapted = L.base_linear(base, xg) + self.scale * torch.nn.functional.linear(h, self.B).to(y.dtype)
        return keep + g_out * adapted  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        W = L.weight_out_in(base)  # (out, in)
        g_out, g_in = (g.to(W.dtype) for g in self.gains(base))
        V = W + self.scale * (self.B @ self.A).to(W.dtype)  # (out, in)
        return L.to_base_layout(base, g_out[:, None] * V * g_in[None, :] - W)

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Approximate: the best rank-(``rank`` or 2r) factorisation of the exact (full-rank) merged delta."""
        with torch.no_grad():
            delta = L.to_base_layout(base, self.delta_weight(base))  # back to (out, in)
            return factorize(delta, rank or 2 * self.config.r)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {**super().export_state(), "lora_magnitude_vector": self.m, "bora_magnitude_in": self.m_in}
