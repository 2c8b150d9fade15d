"""GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning — https://arxiv.org/abs/2505.20355
Update rule: ΔW = s·[B_j^(n)·A_n^(j)]_{j,n}, a k×k grid of rank-(r/k) blocks, s = α/(r + hybrid_r).

W is cut into k×k blocks (output block j, input block n). Input block n has its own
A_n (r × in/k) and output block j its own B_j (out/k × r); the r rows of A_n and columns of B_j
come in k groups of r/k, and block (j, n) pairs group j of A_n with group n of B_j. The parameter
count equals LoRA's at rank r while rank(ΔW) reaches k·r. Hybrid GraLoRA adds a plain LoRA
of rank hybrid_r on the whole matrix. Tensors use PEFT's layouts: A (k, in/k, r), B (k, r, out/k).
Init: Kaiming-uniform A, zero B, so ΔW = 0. Wraps Linear and GPT-2 Conv1D (as PEFT; no embeddings).
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
class GraloraConfig:
    r: int = 32
    """Rank of each input block's A and output block's B; ΔW's rank reaches gralora_k·r."""
    alpha: float = 64.0
    """Scaling numerator: the update is multiplied by alpha/(r + hybrid_r)."""
    gralora_k: int = 2
    """Blocks per side (k×k grid); must divide r, in_features and out_features (2 for r ≤ 32, 4 above)."""
    hybrid_r: int = 0
    """Rank of an extra plain LoRA over the whole matrix (Hybrid GraLoRA); 0 turns it off."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input path during training."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")
        require(
            isinstance(self.gralora_k, int) and self.gralora_k > 0, f"gralora_k must be >= 1, got {self.gralora_k!r}."
        )
        require(self.r % self.gralora_k == 0, f"gralora_k={self.gralora_k} must divide r={self.r}.")
        require(isinstance(self.hybrid_r, int) and self.hybrid_r >= 0, f"hybrid_r must be >= 0, got {self.hybrid_r!r}.")
        require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def scale(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


@register(
    "gralora",
    config=GraloraConfig,
    paper="GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning",
    url="https://arxiv.org/abs/2505.20355",
    family="F2",
    params="(r+hybrid_r)*(d_in+d_out)",
    layers=("linear", "conv1d"),
)
class Gralora(AdapterModule):
    """x ↦ W₀x + s·(ΔW_grid·x + B_h·A_h·x), the grid applied block by block (never materialised)."""

    peft_type = "GRALORA"

    def __init__(self, cfg: GraloraConfig, in_features: int, out_features: int, weight: torch.Tensor):
        super().__init__()
        k, r, h = cfg.gralora_k, cfg.r, cfg.hybrid_r
        self.config, self.scale = cfg, cfg.scale
        factory: dict[str, Any] = {"dtype": weight.dtype, "device": weight.device}
        A = torch.empty(k, r, in_features // k, **factory)  # (k, r, in/k), initialised as PEFT: per block
        for block in A:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.A = nn.Parameter(A.transpose(1, 2).contiguous())  # (k, in/k, r)
        self.B = nn.Parameter(torch.zeros(k, r, out_features // k, **factory))  # (k, r, out/k)
        self.A_h = nn.Parameter(torch.empty(h, in_features, **factory)) if h else None  # (h, in)
        self.B_h = nn.Parameter(torch.zeros(out_features, h, **factory)) if h else None  # (out, h)
        if self.A_h is not None:
            nn.init.kaiming_uniform_(self.A_h, a=math.sqrt(5))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def from_base(cls, base: nn.Module, cfg: GraloraConfig) -> Gralora:
        d_in, d_out = L.dims(base)
        k = cfg.gralora_k
        require(
            d_in % k == 0 and d_out % k == 0,
            f"gralora_k={k} must divide the layer's in_features ({d_in}) and out_features ({d_out}); "
            "choose a gralora_k that divides both, or leave this module out of targets.",
        )
        return cls(cfg, d_in, d_out, L.weight_out_in(base))

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        k, s = self.config.gralora_k, self.config.r // self.config.gralora_k
        x = self.dropout(x).to(self.A.dtype)
        lead = x.shape[:-1]
        h = torch.einsum("...ni,nir->...nr", x.view(*lead, k, -1), self.A)  # (..., k_in, r)
        h = h.view(*lead, k, k, s).transpose(-3, -2).reshape(*lead, k, k * s)  # (..., k_out, r): group j of every n
        out = torch.einsum("...jr,jro->...jo", h, self.B).reshape(*lead, -1)  # (..., out)
        if self.A_h is not None and self.B_h is not None:
            out = out + torch.nn.functional.linear(torch.nn.functional.linear(x, self.A_h), self.B_h)  # (..., out)
        return y + (self.scale * out).to(y.dtype)

    def lora_rank(self) -> int:
        return self.config.gralora_k * self.config.r + self.config.hybrid_r  # to_lora's SVD is exact at this rank

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in): block (j, n) = B_j^(n)·A_n^(j), plus the hybrid LoRA, times s."""
        k, s = self.config.gralora_k, self.config.r // self.config.gralora_k
        A = self.A.view(k, self.A.shape[1], k, s)  # (n, in/k, j, s)
        B = self.B.view(k, k, s, self.B.shape[2])  # (j, n, s, out/k)
        delta = torch.einsum("jnso,nijs->joni", B, A).reshape(k * B.shape[3], k * A.shape[1])  # (out, in)
        if self.A_h is not None and self.B_h is not None:
            delta = delta + self.B_h @ self.A_h  # (out, in)
        return self.scale * delta

    def export_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"gralora_A": self.A, "gralora_B": self.B}
        if self.A_h is not None and self.B_h is not None:
            state |= {"gralora_A_general.weight": self.A_h, "gralora_B_general.weight": self.B_h}
        return state

    @staticmethod
    def peft_fields(cfg: GraloraConfig) -> dict[str, Any]:
        return {
            "r": cfg.r,
            "alpha": cfg.alpha,
            "gralora_k": cfg.gralora_k,
            "hybrid_r": cfg.hybrid_r,
            "gralora_dropout": cfg.dropout,
            "init_weights": True,
        }

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> GraloraConfig | None:
        if fields.get("peft_type") != "GRALORA":
            return None
        d = GraloraConfig()
        return GraloraConfig(
            r=int(fields.get("r") or d.r),
            alpha=float(fields.get("alpha") or d.alpha),
            gralora_k=int(fields.get("gralora_k") or d.gralora_k),
            hybrid_r=int(fields.get("hybrid_r") or 0),
            dropout=float(fields.get("gralora_dropout") or 0.0),
        )
