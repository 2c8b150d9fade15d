"""DARE (Yu et al., 2024: Language Models are Super Mario) — https://arxiv.org/abs/2311.03099
Rule: τ̃_i = m_i ⊙ ΔW_i / p, m_i ~ Bernoulli(p = density) per entry; then Σ w_i τ̃_i (dare_linear)
or the TIES sign election and weighted disjoint mean of the τ̃_i (dare_ties).

E[τ̃_i] = ΔW_i. Masks come from the merge's seeded generator (``seed``), drawn task by task as
PEFT's ``merge_utils.random_pruning`` draws them, so the same seed gives PEFT's masks.
"""

from __future__ import annotations

import torch

from lorakit.compose._api import merge_method
from lorakit.compose.ties import disjoint_mean


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it."""
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)  # (out, in) of 0/1
    return delta * mask / density


@merge_method(
    "dare_linear",
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    url="https://arxiv.org/abs/2311.03099",
    exact=False,
    needs_delta=True,
)
def dare_linear(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Σ w_i·drop_and_rescale(ΔW_i)."""
    dropped = [drop_and_rescale(d, density, generator) for d in deltas]
    return sum((w * d for w, d in zip(weights, dropped, strict=True)), torch.zeros_like(deltas[0]))


@merge_method(
    "dare_ties",
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    url="https://arxiv.org/abs/2311.03099",
    exact=False,
    needs_delta=True,
)
def dare_ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIES' sign election and weighted disjoint mean over the dropped-and-rescaled deltas."""
    return disjoint_mean([drop_and_rescale(d, density, generator) for d in deltas], weights)
