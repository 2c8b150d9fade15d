"""Towards Higher Effective Rank in Parameter-efficient Fine-tuning using Khatri–Rao Product — https://arxiv.org/abs/2508.00230
Update rule: h = W₀x + s·ΔW·x, ΔW the Khatri–Rao product B ⊙ A: column j of ΔW (min side) is kron(B_j, A_j).

KRAdapter, as the authors' code (github.com/PaulAlbert31/KRAdapter): with d_min = min(d_in, d_out),
d_max = max(d_in, d_out), k₁ = ⌊√d_max⌋ and k₂ = ⌈d_max/k₁⌉, the trained factors are B (d_min, k₁) and
A (d_min, k₂); row j of the (d_min, d_max) matrix K is kron(B[j], A[j]) cut to its first d_max entries,
and ΔW = K (out = d_min) or Kᵀ (out = d_max). That is d_min·(k₁ + k₂) ≈ 2·d_min·√d_max parameters —
about LoRA's at rank √d_max — yet ΔW has full rank for generic factors. Init as theirs: A Kaiming-uniform,
B zero (ΔW = 0); s = alpha (their scaling 1). The forward builds the dense ΔW and applies it.
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
class KRAdapterConfig:
    alpha: float = 1.0
    """Scale s that multiplies ΔW (the authors use 1)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


def kr_sizes(d_in: int, d_out: int) -> tuple[int, int, int, int]:
    """(d_min, d_max, k₁, k₂): factor widths with k₁·k₂ ≥ d_max, k₁ = ⌊√d_max⌋."""
    lo, hi = min(d_in, d_out), max(d_in, d_out)
    k1 = math.isqrt(hi)
    return lo, hi, k1, -(-hi // k1)


@register(
    "kradapter",
    config=KRAdapterConfig,
    paper="Towards Higher Effective Rank in Parameter-efficient Fine-tuning using Khatri–Rao Product (KRAdapter)",
    url="https://arxiv.org/abs/2508.00230",
    family="F2",
    params="(d_in + d_out - (hi := d_in if d_in > d_out else d_out)) * ((k := hi ** 0.5 // 1) + -(-hi // k))",
)
class KRAdapter(AdapterModule):
    """x ↦ W₀x + s·ΔW·x with ΔW the Khatri–Rao product of B (d_min, k₁) and A (d_min, k₂)."""

    def __init__(self, cfg: KRAdapterConfig, d_in: int, d_out: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.d_in, self.d_out = cfg, d_in, d_out
        lo, _, k1, k2 = kr_sizes(d_in, d_out)
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        self.A = nn.Parameter(torch.empty(lo, k2, **factory))  # (d_min, k₂)
        self.B = nn.Parameter(torch.zeros(lo, k1, **factory))  # (d_min, k₁)
        nn.init.uniform_(self.A, -(k2**-0.5), k2**-0.5)  # the authors' kaiming_uniform_(a=√5) on (d_min, 1, k₂)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: KRAdapterConfig) -> KRAdapter:
        d_in, d_out = L.dims(base)
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in) = s·K or s·Kᵀ, K[j] = kron(B[j], A[j])[:d_max]."""
        hi = max(self.d_in, self.d_out)
        K = (self.B[:, :, None] * self.A[:, None, :]).flatten(1)[:, :hi]  # (d_min, d_max)
        return self.config.alpha * (K if self.d_out <= self.d_in else K.T)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + L.project_in(base, self.dropout(x), self.delta_out_in(base)).to(y.dtype)  # (..., out)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"kradapter_A": self.A, "kradapter_B": self.B}

    @staticmethod
    def peft_fields(cfg: KRAdapterConfig) -> dict[str, Any]:
        return {"alpha": cfg.alpha}
