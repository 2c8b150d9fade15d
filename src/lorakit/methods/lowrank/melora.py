"""MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning — https://arxiv.org/abs/2402.17263
Update rule: h = W₀x + s·diag(B₁A₁, …, B_nA_n)·x — n mini-LoRAs of rank r on the diagonal blocks, s = alpha/r.

Input and output are cut into n equal contiguous slices; mini-LoRA i maps input slice i to output
slice i (A_i: (r, d_in/n), B_i: (d_out/n, r)), and every off-diagonal block of ΔW is exactly 0. The
trainable parameters equal one LoRA of rank r, r·(d_in + d_out), while ΔW has rank up to n·r.
Defaults are the authors' instruction-tuning run (r = 1, n = 8, lora_alpha = 16); inits as LoRA
(Kaiming-uniform A_i, zero B_i; for embeddings zero A_i, normal B_i), so the model starts as the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.lowrank import truncate
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class MeloraConfig:
    r: int = 1
    """Rank of each mini-LoRA; ΔW has rank up to n·r for the parameters of one rank-r LoRA."""
    n: int = 8
    """Number of mini-LoRAs (diagonal blocks); must divide both d_in and d_out of every targeted layer."""
    alpha: float = 16.0
    """Scaling numerator: each mini-LoRA's update is multiplied by alpha/r."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(isinstance(self.n, int) and self.n > 0, f"n must be a positive integer, got {self.n!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")


@register(
    "melora",
    config=MeloraConfig,
    paper="MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning",
    url="https://arxiv.org/abs/2402.17263",
    family="F2",
    params="r*(d_in+d_out)",
)
class Melora(AdapterModule):
    """x ↦ W₀x + s·B·A·x with A = blockdiag(A₁..A_n) (n·r, in) and B = blockdiag(B₁..B_n) (out, n·r)."""

    def __init__(self, cfg: MeloraConfig, in_features: int, out_features: int, kind: str, weight: torch.Tensor):
        super().__init__()
        self.config, self.kind, self.scale = cfg, kind, cfg.alpha / cfg.r
        n, r = cfg.n, cfg.r
        factory: dict[str, Any] = {
            "dtype": weight.dtype if weight.is_floating_point() else None,
            "device": weight.device,
        }
        self.A = nn.Parameter(torch.empty(n, r, in_features // n, **factory))  # (n, r, in/n)
        self.B = nn.Parameter(torch.empty(n, out_features // n, r, **factory))  # (n, out/n, r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and kind != "embedding" else nn.Identity()
        with torch.no_grad():
            for i in range(n):
                if kind == "embedding":  # as LoRA on embeddings: the roles of A and B swap
                    nn.init.zeros_(self.A[i])
                    nn.init.normal_(self.B[i])
                else:
                    nn.init.kaiming_uniform_(self.A[i], a=math.sqrt(5))
                    nn.init.zeros_(self.B[i])

    @classmethod
    def from_base(cls, base: nn.Module, cfg: MeloraConfig) -> Melora:
        d_in, d_out = L.dims(base)
        if d_in % cfg.n or d_out % cfg.n:
            raise ConfigError(
                f"melora n={cfg.n} mini-LoRAs must divide both dimensions of a targeted layer, but it has "
                f"d_in={d_in}, d_out={d_out}; pick an n that divides both (e.g. a common power of two) "
                "or leave that layer out of targets."
            )
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return cls(cfg, d_in, d_out, L.layer_kind(base), weight)

    def block_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The block-diagonal (A (n·r, in), B (out, n·r)); their product is diag(B₁A₁, …, B_nA_n)."""
        return torch.block_diag(*self.A), torch.block_diag(*self.B)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":  # a token id picks one input slice: the dense block-diagonal A does the lookup
            A, B = self.block_factors()
            h = L.project_in(base, x, A)  # (..., n·r)
            return y + (torch.nn.functional.linear(h, B) * self.scale).to(y.dtype)
        xs = self.dropout(x).to(self.A.dtype).unflatten(-1, (self.config.n, -1))  # (..., n, in/n)
        h = torch.einsum("...ni,nri->...nr", xs, self.A)  # (..., n, r)
        out = torch.einsum("...nr,nor->...no", h, self.B).flatten(-2)  # (..., out)
        return y + (out * self.scale).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.scale * torch.block_diag(*(self.B @ self.A)))  # (out, in) -> base layout

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """Exact at rank n·r (the block-diagonal A and B); with ``rank``, the best rank-``rank`` truncation."""
        with torch.no_grad():
            A, B = self.block_factors()
        d_in, d_out = L.dims(base)
        return truncate(LoraFactors(A, B, self.scale), min(rank or A.shape[0], d_in, d_out))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"melora_A": self.A, "melora_B": self.B}

    @staticmethod
    def peft_fields(cfg: MeloraConfig) -> dict[str, Any]:
        return {"r": cfg.r, "lora_alpha": cfg.alpha}
