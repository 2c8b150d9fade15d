"""Orthogonal MC Dropout (Zhang et al., 2025: Rethinking Inter-LoRA Orthogonality in Adapter Merging) — https://arxiv.org/abs/2510.03262
Rule: each output dimension j is kept by exactly one adapter o(j) ~ U{0..k-1}; y = Σ_i k·w_i·(m_i ⊙ ΔW_i x),
m_i = [o(j) = i], so the k outputs have disjoint supports (⟨y_i, y_j⟩ = 0, i ≠ j) and E_o[y] = Σ_i w_i ΔW_i x.

Disjoint dropout masks with keep probability 1/k, rescaled by k. As a stored merge it is one
Monte-Carlo sample of the masks (drawn per module from the merge's ``seed``); it stays exact in
factor form: A = cat(A_i), B = cat(k·w_i·s_i·diag(m_i)·B_i), rank Σ r_i.
"""

from __future__ import annotations

import torch

from lorakit.compose._api import merge_method
from lorakit.lowrank import LoraFactors


def owners(d_out: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which adapter keeps each output dimension: (d_out,) ints, uniform over 0..k-1."""
    return torch.randint(k, (d_out,), generator=generator)


def masked_sum(factors: list[LoraFactors], weights: list[float], owner: torch.Tensor) -> LoraFactors:
    """Σ_i k·w_i·s_i·diag(owner == i)·B_i@A_i as stacked factors."""
    k = len(factors)
    A = torch.cat([f.A.float() for f in factors], 0)  # (Σr, in)
    B = torch.cat(
        [
            k * w * f.scale * (owner == i).unsqueeze(1) * f.B.float()
            for i, (w, f) in enumerate(zip(weights, factors, strict=True))
        ],
        1,
    )  # (out, Σr)
    return LoraFactors(A, B, 1.0)


@merge_method(
    "ortho_dropout",
    paper="Rethinking Inter-LoRA Orthogonality in Adapter Merging: Insights from Orthogonal Monte Carlo Dropout",
    url="https://arxiv.org/abs/2510.03262",
    exact=True,
    needs_delta=False,
)
def ortho_dropout(
    factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator | None = None
) -> LoraFactors:
    """One sample of disjoint per-output-dimension masks, rescaled by k."""
    return masked_sum(factors, weights, owners(factors[0].B.shape[0], len(factors), generator))
