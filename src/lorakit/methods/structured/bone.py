"""Bone: Block-Affine Adaptation of Large Language Models — https://arxiv.org/abs/2409.15371
Update rule: ΔW_ij = W₀_ij·B_i + B_i for every r×r block (i, j) of W₀, one trainable B_i per output block-row.

W₀ (out, in) is cut into r×r blocks; block (i, j) is transformed by the matrix B_i that all blocks of
output block-row i share, so the update uses W₀ itself (weight-guided, not a free low-rank term):
W₀_ij ↦ W₀_ij·(I + B_i) + B_i. The trainable tensor is B (out/r, r, r): d_out·r parameters, one
matrix per layer. This is PEFT's MiSS with ``init_weights="bat"`` (its old BoneConfig "bat" mode),
whose tensor is saved as ``miss_block``. Init: B = 0, so ΔW = 0. ΔW is built from W₀ each forward
(as PEFT does), which costs out·in·r multiply-adds once per call, independent of the token count.
Wraps Linear and GPT-2 Conv1D (PEFT's MiSS wraps only nn.Linear; no embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.lowrank import factorize
from lorakit.methods._api import AdapterModule, LoraFactors, register, require


@dataclass(frozen=True, kw_only=True)
class BoneConfig:
    r: int = 32
    """Block size: must divide in_features and out_features (params = d_out·r). PEFT's default is 64 (LoRA-r=32
    budget at width 4096); 32 also fits 32-wide layers such as the tiny test Llama's k/v projections."""

    def __post_init__(self) -> None:
        require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}.")


@register(
    "bone",
    config=BoneConfig,
    paper="Bone: Block-Affine Adaptation of Large Language Models",
    url="https://arxiv.org/abs/2409.15371",
    family="F2",
    params="d_out*r",
    layers=("linear", "conv1d"),
)
class Bone(AdapterModule):
    """x ↦ (W₀ + ΔW)·x + b with ΔW_ij = W₀_ij·B_i + B_i (blocks of size r)."""

    peft_type = "MISS"

    def __init__(self, cfg: BoneConfig, out_features: int, weight: torch.Tensor):
        super().__init__()
        self.config = cfg
        self.B = nn.Parameter(
            torch.zeros(out_features // cfg.r, cfg.r, cfg.r, dtype=weight.dtype, device=weight.device)
        )

    @classmethod
    def from_base(cls, base: nn.Module, cfg: BoneConfig) -> Bone:
        d_in, d_out = L.dims(base)
        require(
            d_in % cfg.r == 0 and d_out % cfg.r == 0,
            f"bone r={cfg.r} (the block size) must divide the layer's in_features ({d_in}) and out_features "
            f"({d_out}); choose a common divisor, or leave this module out of targets.",
        )
        return cls(cfg, d_out, L.weight_out_in(base))

    def delta_out_in(self, base: nn.Module) -> torch.Tensor:
        """ΔW (out, in): block (i, j) = W₀_ij @ B_i + B_i."""
        W = L.weight_out_in(base).detach().to(self.B.dtype)  # (out, in)
        out_features, in_features = W.shape
        r = self.config.r
        blocks = W.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)  # (out/r, in/r, r, r)
        delta = blocks @ self.B[:, None] + self.B[:, None]  # (out/r, in/r, r, r): B_i shared along j
        return delta.transpose(1, 2).reshape(out_features, in_features)  # (out, in)

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return y + torch.nn.functional.linear(x.to(self.B.dtype), self.delta_out_in(base)).to(y.dtype)  # (..., out)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return L.to_base_layout(base, self.delta_out_in(base))

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors:
        """ΔW is full rank in general: exact at rank min(d_in, d_out), else the best rank-``rank`` SVD truncation."""
        with torch.no_grad():
            delta = self.delta_out_in(base)  # (out, in)
            return factorize(delta, rank or min(delta.shape))

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"miss_block": self.B}

    @staticmethod
    def peft_fields(cfg: BoneConfig) -> dict[str, Any]:
        return {"r": cfg.r, "init_weights": "bat", "mini_r": 1, "miss_dropout": 0.0}

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> BoneConfig | None:
        """PEFT's MiSS in its "bat" mode; MiSS's other modes (default, "mini") are a different update."""
        if fields.get("peft_type") != "MISS" or fields.get("init_weights") != "bat":
            return None
        return BoneConfig(r=int(fields.get("r") or 64))
