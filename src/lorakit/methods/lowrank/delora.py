"""DeLoRA: Decoupling Angles and Strength in Low-rank Adaptation — https://arxiv.org/abs/2503.18225
Update rule: ΔW = (λ/r)·B·diag(1/(‖a_i‖·‖b_i‖))·A·diag(‖W₀‖_col), so ‖ΔW‖_F ≤ λ·‖W₀‖_F whatever A and B.

Each of the r rank-one terms b_i a_iᵀ is normalised to unit Frobenius norm (the "angle"), the
trainable scalar λ sets the "strength", and the frozen column norms ‖W₀[:, j]‖ of the base weight
(taken once at init, a persistent buffer as in PEFT) scale input channel j. Norms are clamped at
1e-4 as PEFT does. Init: Kaiming-uniform A, zero B, λ = 15 (PEFT's default), so ΔW = 0 at init.
Wraps Linear and GPT-2 Conv1D (PEFT's DeLoRA wraps only nn.Linear; no embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require

EPS = 1e-4  # PEFT's clamp on the row norms of A and column norms of B


@dataclass(frozen=True, kw_only=True)
class DeloraConfig:
    r: int = 8
    """Rank: the number of normalised rank-one terms in ΔW."""
    delora_lambda: float = 15.0
    """Initial strength λ (trainable, one per layer): the bound ‖ΔW‖_F ≤ λ·‖W₀‖_F."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training (PEFT's module_dropout)."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(self.delora_lambda >= 0, f"delora_lambda must be >= 0, got {self.delora_lambda!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


@register(
    "delora",
    config=DeloraConfig,
    paper="DeLoRA: Decoupling Angles and Strength in Low-rank Adaptation",
    url="https://arxiv.org/abs/2503.18225",
    family="F2",
    params="r*(d_in+d_out)+1",
    layers=("linear", "conv1d"),
)
class Delora(AdapterModule):
    """x ↦ W₀x + B·(g ⊙ A·(w ⊙ x)) with g_i = (λ/r)/(‖a_i‖·‖b_i‖) and w = ‖W₀‖_col (frozen)."""

    peft_type = "DELORA"
    w_norm: torch.Tensor  # (in,) buffer: the base's column norms ‖W₀[:, j]‖, frozen at init

    def __init__(self, cfg: DeloraConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config = cfg
        factory: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        self.A = nn.Parameter(torch.empty(cfg.r, in_features, **factory))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, cfg.r, **factory))  # (out, r)
        self.lam = nn.Parameter(torch.full((1,), float(cfg.delora_lambda), **factory))  # (1,)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.register_buffer("w_norm", torch.ones(in_features, **factory))  # (in,)

    @classmethod
    def from_base(cls, base: nn.Module, cfg: DeloraConfig) -> Delora:
        in_features, out_features = L.dims(base)
        weight = L.weight_out_in(base)  # (out, in)
        adapter = cls(cfg, in_features, out_features, weight)
        with torch.no_grad():
            adapter.w_norm.copy_(torch.linalg.vector_norm(weight.detach(), dim=0))  # ‖W₀[:, j]‖, (in,)
        return adapter

    def gains(self) -> torch.Tensor:
        """g_i = (λ/r) / (‖a_i‖·‖b_i‖), shape (r,)."""
        a_norm = self.A.norm(dim=1).clamp(min=EPS)  # (r,)
        b_norm = self.B.norm(dim=0).clamp(min=EPS)  # (r,)
        return self.lam / self.config.r / (a_norm * b_norm)  # (r,)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        h = L.project_in(base, self.dropout(x).to(self.A.dtype) * self.w_norm, self.A)  # (..., r)
        return y + torch.nn.functional.linear(h * self.gains(), self.B).to(y.dtype)  # (..., out)

    def factors(self) -> LoraFactors:
        """ΔW exactly as B'·A' with A' = A·diag(w) (r, in), B' = B·diag(g) (out, r)."""
        return LoraFactors(self.A * self.w_norm, self.B * self.gains(), 1.0)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        f = self.factors()
        return L.to_base_layout(base, f.B @ f.A)  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank r; with ``rank`` < r, the best rank-``rank`` truncation."""
        with torch.no_grad():
            f = self.factors()
        return f if rank is None else truncate(f, rank)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"delora_A": self.A, "delora_B": self.B, "delora_lambda": self.lam, "delora_w_norm": self.w_norm}

    @staticmethod
    def peft_fields(cfg: DeloraConfig) -> dict[str, Any]:
        return {
            "r": cfg.r,
            "delora_lambda": cfg.delora_lambda,
            "module_dropout": cfg.dropout,
            "init_weights": True,
            "lambda_pattern": {},
        }

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> DeloraConfig | None:
        if fields.get("peft_type") != "DELORA":
            return None
        d = DeloraConfig()
        return DeloraConfig(
            r=int(fields.get("r") or d.r),
            delora_lambda=float(fields.get("delora_lambda", d.delora_lambda)),
            dropout=float(fields.get("module_dropout") or 0.0),
        )
