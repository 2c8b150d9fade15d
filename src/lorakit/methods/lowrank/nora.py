"""NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning Large Models — https://arxiv.org/abs/2408.10280
Update rule: h = W₀x + s·B_o·(B_i·A_i)·A_o·x, outer B_o, A_o frozen from the SVD of W₀, inner r-rank B_i·A_i trained.

The outer LoRA is the rank-``outer_r`` SVD of the base weight, split evenly as in PiSSA: B_o = U_R·√Σ_R
(out, R) and A_o = √Σ_R·V_Rᵀ (R, in). Inside it sits an ordinary LoRA of rank r on the R-dimensional
spectral coordinates: A_i (r, R) Kaiming-uniform and B_i (R, r) zero, so the model starts exactly as the
base, and only 2·r·R parameters train. Choices the paper leaves open (we take the simplest faithful
ones): the even √Σ split, s = alpha/r as in LoRA, and ``r`` naming the inner (trained) rank, which is
the rank of ΔW, as elsewhere in lorakit. The frozen factors are recomputed from the base weight on
attach and load (never saved), with each singular pair's sign fixed so one base always gives the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class NoraConfig:
    r: int = 8
    """Rank r' of the trained inner LoRA (B_i·A_i), which is the rank of the update; at most outer_r."""
    outer_r: int = 32
    """Rank R of the frozen outer LoRA taken from the SVD of the base weight; at most min(d_in, d_out)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(
            isinstance(self.outer_r, int) and self.outer_r >= self.r,
            f"outer_r must be an integer >= r={self.r} (the inner LoRA lives in the outer rank-outer_r space), "
            f"got {self.outer_r!r}.",
        )
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def top_svd(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k (out, k), σ_k (k,), V_kᵀ (k, in)) of an (out, in) weight, each u_i's largest-|·| entry made positive."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # U (out, m), S (m,), Vh (m, in)
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    sign = torch.sign(U.gather(0, U.abs().argmax(dim=0, keepdim=True)))  # (1, k)
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign.T


@register(
    "nora",
    config=NoraConfig,
    paper="NoRA: Nested Low-Rank Adaptation for Efficient Fine-Tuning Large Models",
    url="https://arxiv.org/abs/2408.10280",
    family="F2",
    params="2*r*outer_r",
)
class Nora(AdapterModule):
    """x ↦ W₀x + s·B_o·B_i·A_i·A_o·x with frozen buffers A_o (R, in), B_o (out, R) and trained A_i, B_i."""

    A_o: torch.Tensor
    B_o: torch.Tensor

    def __init__(self, cfg: NoraConfig, A_o: torch.Tensor, B_o: torch.Tensor, kind: str):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.scale
        self.register_buffer("A_o", A_o, persistent=False)  # (R, in), recomputed from the base, never saved
        self.register_buffer("B_o", B_o, persistent=False)  # (out, R)
        self.A_i = nn.Parameter(torch.empty(cfg.r, cfg.outer_r, dtype=A_o.dtype, device=A_o.device))  # (r, R)
        self.B_i = nn.Parameter(torch.zeros(cfg.outer_r, cfg.r, dtype=A_o.dtype, device=A_o.device))  # (R, r)
        nn.init.kaiming_uniform_(self.A_i, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: NoraConfig) -> Nora:
        d_in, d_out = L.dims(base)
        require(
            cfg.outer_r <= min(d_in, d_out),
            f"nora outer_r={cfg.outer_r} exceeds the rank a layer with d_in={d_in}, d_out={d_out} can have "
            f"({min(d_in, d_out)}); lower outer_r or leave that layer out of targets.",
        )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        U, S, Vh = top_svd(L.weight_out_in(base), cfg.outer_r)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        root = S.sqrt()  # (R,)
        return cls(cfg, (root[:, None] * Vh).to(dtype), (U * root).to(dtype), L.layer_kind(base))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x), self.A_o)  # (..., R)
        h = F.linear(F.linear(h, self.A_i), self.B_i)  # (..., r) -> (..., R)
        return y + (F.linear(h, self.B_o) * self.scale).to(y.dtype)  # (..., out)

    def factors(self) -> LoraFactors:
        """The plain LoRA pair A = A_i·A_o (r, in), B = B_o·B_i (out, r) and s."""
        return LoraFactors(self.A_i @ self.A_o, self.B_o @ self.B_i, self.scale)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.scale * (f.B @ f.A))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r (A = A_i·A_o, B = B_o·B_i); with ``rank`` < r, the best rank-``rank`` truncation."""
        with torch.no_grad():
            f = self.factors()
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"nora_A": self.A_i, "nora_B": self.B_i}

    @staticmethod
    def peft_fields(cfg: NoraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha}
