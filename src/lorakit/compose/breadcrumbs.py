"""Model Breadcrumbs (Davari & Belilovsky, 2024: Scaling Multi-Task Model Merging with Sparse Masks) — https://arxiv.org/abs/2312.06795
Rule: per task, rank entries by |ΔW_i|; drop the largest ``gamma`` fraction (outliers) and keep the
next ``density`` fraction (the rest, the smallest, is dropped too); ΔW = Σ_i w_i·(m_i ⊙ ΔW_i).
"""

from __future__ import annotations

import torch

from lorakit.compose._api import merge_method


def middle_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Bool mask of the entries ranked int(gamma·n) .. int(gamma·n)+int(density·n)-1 by descending |·|."""
    n = delta.numel()
    top, keep = int(gamma * n), int(density * n)
    order = torch.argsort(delta.abs().reshape(-1), descending=True)  # (n,)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[top : top + keep]] = True
    return mask.reshape(delta.shape)


@merge_method(
    "breadcrumbs",
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    url="https://arxiv.org/abs/2312.06795",
    exact=False,
    needs_delta=True,
)
def breadcrumbs(
    deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.9, gamma: float = 0.01
) -> torch.Tensor:
    """Weighted sum of each delta's middle magnitude band."""
    out = torch.zeros_like(deltas[0])  # (out, in)
    for w, d in zip(weights, deltas, strict=True):
        out += w * d * middle_band(d, density, gamma)
    return out
