"""Concatenation merge, PEFT's ``combination_type="cat"`` (LoRA: Hu et al., 2021) — https://arxiv.org/abs/2106.09685
Rule: A = cat(w_i·s_i·A_i) (Σr, in), B = cat(B_i) (out, Σr), so B@A = Σ_i w_i·ΔW_i exactly.

Same delta as ``linear``; the tensors are PEFT's own (weight and scale in A, B untouched), so an
adapter merged by PEFT and by lorakit from the same inputs holds identical A and B.
"""

from __future__ import annotations

from lorakit.compose._api import concat, merge_method
from lorakit.lowrank import LoraFactors


@merge_method(
    "cat",
    paper="LoRA: Low-Rank Adaptation of Large Language Models (rank concatenation)",
    url="https://arxiv.org/abs/2106.09685",
    exact=True,
    needs_delta=False,
)
def cat(factors: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """Σ w_i·s_i·B_i@A_i exactly, with w_i·s_i in A like PEFT."""
    return concat(factors, weights, into="A")
