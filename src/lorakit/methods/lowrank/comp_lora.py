"""Comp-LoRA: Complementary Subspace Low-Rank Adaptation of Vision-Language Models — https://arxiv.org/abs/2501.15040
Update rule: h = W₀x + s·(I − U_k U_kᵀ)·B·A·x, with U_k (out, k) W₀'s top-k left singular vectors (frozen).

The paper optimises the low-rank update in the complement of W₀'s principal subspace so that the
pretrained directions (which carry the general alignment) are left alone. Here the constraint holds
by construction rather than by a per-step projection: the update's column space is C·B with
C = I − U_k U_kᵀ, so U_kᵀ·ΔW = (U_kᵀ − U_kᵀ U_k U_kᵀ)·s·B·A = 0 after every optimiser step (the gradient
of B is projected the same way). A, B start as LoRA's (B = 0: the model starts as the base). U_k is
recomputed from the base on attach and load (the subspace, not its basis, is what the update sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import register, require
from lorakit.methods.lowrank.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class CompLoraConfig(LoraConfig):
    k: int = 8
    """Number of W₀'s top left singular vectors the update must stay orthogonal to (k < d_out)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.k, int) and self.k > 0, f"comp_lora: k must be a positive integer, got {self.k!r}.")
        require(not self.lora_bias, "comp_lora: lora_bias would add an output shift outside the projection; drop it.")


def top_left_singular(W: torch.Tensor, k: int) -> torch.Tensor:
    """U_k (out, k): the top-k left singular vectors of an (out, in) weight (SVD in float64 for a sharp subspace)."""
    U, _, _ = torch.linalg.svd(W.detach().double(), full_matrices=False)  # U (out, min(out, in))
    return U[:, :k]


@register(
    "comp_lora",
    config=CompLoraConfig,
    paper="Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot Classification",
    url="https://arxiv.org/abs/2501.15040",
    family="F3",
    params="(r*d_out if train_only == 'B' else r*(d_in+d_out))",
)
class CompLora(Lora):
    """x ↦ W₀x + s·C·B·A·x, C = I − U_k U_kᵀ applied as C·B = B − U_k (U_kᵀ B)."""

    peft_type = None  # type: ignore[assignment]  # PEFT has no Comp-LoRA (LoRA's is "LORA")
    Uk: torch.Tensor

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> CompLora:
        assert isinstance(cfg, CompLoraConfig)
        d_in, d_out = L.dims(base)
        require(
            cfg.k < d_out and cfg.k <= min(d_in, d_out),
            f"comp_lora: k={cfg.k} must be below d_out={d_out} and at most min(d_in, d_out)={min(d_in, d_out)} "
            f"for a {d_in}→{d_out} layer, or nothing is left to adapt; lower k or leave that module out.",
        )
        adapter: Any = super().from_base(base, cfg)
        Uk = top_left_singular(L.weight_out_in(base), cfg.k)  # (out, k)
        adapter.register_buffer("Uk", Uk.to(adapter.A.dtype), persistent=False)
        return adapter

    def out_B(self) -> torch.Tensor:
        """C·B = B − U_k (U_kᵀ B), (out, r): B with its component in W₀'s top-k column space removed."""
        return self.B - self.Uk @ (self.Uk.T @ self.B)

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        return Lora.peft_fields(cfg)
