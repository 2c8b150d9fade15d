"""TIES-Merging (Yadav et al., 2023: Resolving Interference When Merging Models) — https://arxiv.org/abs/2306.01708
Rule: τ̂_i = trim(ΔW_i, top-density by |·|); γ = sgn(Σ_i w_i τ̂_i); ΔW = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i,
A = {i : sgn(τ̂_i) = γ} per entry (entries with no agreeing task stay 0).

The disjoint mean is weighted (as in mergekit), so the weights are relative (their common scale
cancels) and K copies of one adapter with weights 1/K give it back; with all weights 1 it is
exactly PEFT's ``merge_utils.ties`` (sign by total mass), which instead divides by the count of
agreeing tasks. It acts on the materialised deltas of one module; the driver re-factors the result.
"""

from __future__ import annotations

import torch

from lorakit.compose._api import merge_method, top_magnitude_mask


def disjoint_mean(tasks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Elect the sign of Σ w_i τ_i per entry, then average the agreeing w_i τ_i, normalised by their Σ w_i."""
    stacked = torch.stack(tasks)  # (K, out, in)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)  # (K, 1, 1)
    weighted = stacked * w  # (K, out, in)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # (out, in)
    agree = stacked.sign() == elected  # (K, out, in); zeros never agree
    total = (weighted * agree).sum(0)  # (out, in)
    divisor = (w * agree).sum(0)  # (out, in)
    return total / torch.where(divisor.abs() < 1e-12, 1.0, divisor)


@merge_method(
    "ties",
    paper="TIES-Merging: Resolving Interference When Merging Models",
    url="https://arxiv.org/abs/2306.01708",
    exact=False,
    needs_delta=True,
)
def ties(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5) -> torch.Tensor:
    """Trim each delta to its top-``density`` magnitudes, elect signs, take the weighted disjoint mean."""
    trimmed = [d if density >= 1.0 else d * top_magnitude_mask(d, density) for d in deltas]
    return disjoint_mean(trimmed, weights)
