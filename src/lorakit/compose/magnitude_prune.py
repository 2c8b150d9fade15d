"""Magnitude pruning of task vectors (the trim step of TIES-Merging alone) — https://arxiv.org/abs/2306.01708
Rule: ΔW = Σ_i w_i·trim(ΔW_i), trim keeping the int(density·numel) entries of largest |·|.

Equals PEFT's ``merge_utils.magnitude_prune`` on the same deltas (no sign election, no rescale).
"""

from __future__ import annotations

import torch

from lorakit.compose._api import merge_method, top_magnitude_mask


@merge_method(
    "magnitude_prune",
    paper="TIES-Merging: Resolving Interference When Merging Models (trim step)",
    url="https://arxiv.org/abs/2306.01708",
    exact=False,
    needs_delta=True,
)
def magnitude_prune(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5) -> torch.Tensor:
    """Weighted sum of the magnitude-trimmed deltas."""
    out = torch.zeros_like(deltas[0])  # (out, in)
    for w, d in zip(weights, deltas, strict=True):
        out += w * (d if density >= 1.0 else d * top_magnitude_mask(d, density))
    return out
