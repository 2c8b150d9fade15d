"""Transformed Low-rank Adaptation via Tensor Decomposition (TLoRA) — https://arxiv.org/abs/2501.08727
Update rule: W' = T·W₀ + R — a learned full-rank transform T of the pre-trained weight plus a compact residual R.

Both parts are tensor-train matrices of order 2 (TT-rank k: a sum of k Kronecker products), over modes
n_o = ⌈√d_out⌉ and n_i = ⌈√d_in⌉:
  T = [Σ_a T1_a ⊗ T2_a][:out, :out]  with T1_a, T2_a (n_o, n_o), a < t_rank   — dense and full rank
  R = [Σ_b R1_b ⊗ R2_b][:out, :in]   with R1_b, R2_b (n_o, n_i), b < r
so the forward is h = T·(W₀x) + R·x + bias; merging folds W₀ ← T·W₀ + R. Parameters: 2·t_rank·n_o² + 2·r·n_o·n_i.
Init: T1_0 = T2_0 = I (so T = I), the other transform terms Gaussian ⊗ zero, R1 Gaussian and R2 = 0 (so
R = 0): the model starts as the base and every factor gets a gradient. Choices made here (the simplest that
fit the paper's transform-plus-residual scheme): the transform acts on the output side (as DoRA's magnitude
does in lorakit's (out, in) orientation), both parts use the order-2 TT-matrix format, and widths are padded
up to the square of a mode size and cropped. DoRA is the special case T = diag(m/‖W₀ + sBA‖_row), R = T·sBA,
exact with t_rank = n_o and r = n_o·n_i (see tests/methods/test_tlora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register, require


@dataclass(frozen=True, kw_only=True)
class TloraConfig:
    r: int = 4
    """TT-rank of the residual R (its number of Kronecker terms)."""
    t_rank: int = 1
    """TT-rank of the transform T (t_rank = 1: a single Kronecker product T1 ⊗ T2, already full rank)."""
    dropout: float = 0.0
    """Dropout probability on the residual's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(
            isinstance(self.t_rank, int) and self.t_rank > 0, f"t_rank must be a positive integer, got {self.t_rank!r}."
        )
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


def mode(d: int) -> int:
    """⌈√d⌉: the mode size whose square covers d."""
    return math.isqrt(d - 1) + 1


def kron_sum(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Σ_k left_k ⊗ right_k for left (k, a, b), right (k, c, d): shape (a·c, b·d)."""
    (_, a, b), (_, c, d) = left.shape, right.shape
    return torch.einsum("kab,kcd->acbd", left, right).reshape(a * c, b * d)


@register(
    "tlora",
    config=TloraConfig,
    paper="Transformed Low-rank Adaptation via Tensor Decomposition and Its Applications to Text-to-image Models",
    url="https://arxiv.org/abs/2501.08727",
    family="F2",
    # n_o, n_i = ⌈√d⌉ (the 1e-9 absorbs float error in roots of perfect squares)
    params="2*(no := -(-(d_out**0.5-1e-9)//1))*(t_rank*no + r*-(-(d_in**0.5-1e-9)//1))",
)
class Tlora(AdapterModule):
    """x ↦ T·(W₀x) + R·x + b with T = crop(Σ T1_a ⊗ T2_a) (out, out) and R = crop(Σ R1_b ⊗ R2_b) (out, in)."""

    def __init__(self, cfg: TloraConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out = cfg, d_in, d_out
        dtype = weight.dtype if weight.is_floating_point() else None
        factory: dict[str, Any] = {"dtype": dtype, "device": weight.device}
        no, ni = mode(d_out), mode(d_in)
        T1 = torch.randn(cfg.t_rank, no, no, **factory) * 0.02  # (t, n_o, n_o)
        T1[0] = torch.eye(no, **factory)
        T2 = torch.zeros(cfg.t_rank, no, no, **factory)  # (t, n_o, n_o)
        T2[0] = torch.eye(no, **factory)
        self.T1, self.T2 = nn.Parameter(T1), nn.Parameter(T2)  # T = I ⊗ I + Σ_{a≥1} T1_a ⊗ 0 = I
        self.R1 = nn.Parameter(torch.randn(cfg.r, no, ni, **factory) / math.sqrt(no * ni))  # (r, n_o, n_i)
        self.R2 = nn.Parameter(torch.zeros(cfg.r, no, ni, **factory))  # (r, n_o, n_i): R = 0
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: TloraConfig) -> Tlora:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def transform(self) -> torch.Tensor:
        """T (out, out)."""
        return kron_sum(self.T1, self.T2)[: self.d_out, : self.d_out]

    def residual(self) -> torch.Tensor:
        """R (out, in)."""
        return kron_sum(self.R1, self.R2)[: self.d_out, : self.d_in]

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        bias = L.base_bias(base)
        base_out = y if bias is None else y - bias  # (..., out) = W₀x
        eye = torch.eye(self.d_out, dtype=self.T1.dtype, device=self.T1.device)
        moved = torch.nn.functional.linear(base_out.to(self.T1.dtype), self.transform() - eye)  # (T − I)·W₀x
        return y + (moved + L.project_in(base, self.dropout(x), self.residual())).to(y.dtype)  # (..., out)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) = T·W₀ + R − W₀."""
        W = L.weight_out_in(base)  # (out, in)
        T, R = self.transform().to(W.dtype), self.residual().to(W.dtype)
        return T @ W - W + R

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"tlora_T1": self.T1, "tlora_T2": self.T2, "tlora_R1": self.R1, "tlora_R2": self.R2}

    @staticmethod
    def peft_fields(cfg: TloraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "t_rank": cfg.t_rank, "dropout": cfg.dropout}
