"""Linear merge (model soups: Wortsman et al., 2022) — https://arxiv.org/abs/2203.05482
Rule: ΔW = Σ_i w_i·ΔW_i, exactly, as factors: A = cat(A_i) (Σr, in), B = cat(w_i·s_i·B_i) (out, Σr).

The output rank is Σ r_i (capped, losslessly, at min(out, in)); with ``rank=``/``energy=`` it is
re-factored from the factors (QR of B and Aᵀ, SVD of the small core), never forming ΔW.

Where lorakit differs from PEFT: PEFT's ``add_weighted_adapter(combination_type="linear")`` (and
``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) combines the A's and the B's
separately, A = Σ √(w_i s_i)·A_i and B = Σ √(w_i s_i)·B_i, so B@A = Σ_i Σ_j √(w_i s_i w_j s_j)·B_i@A_j
carries cross terms B_i@A_j (i ≠ j) that belong to no adapter (PEFT issue #3004); it also needs
equal ranks. lorakit merges the products ΔW_i themselves: ``linear`` is the exact weighted sum,
and TIES/DARE/magnitude pruning act on the materialised ΔW_i, like PEFT's ``*_svd`` variants,
before one re-factoring. PEFT's ``cat`` and ``svd`` are exact and lorakit matches them.
"""

from __future__ import annotations

from lorakit.compose._api import concat, merge_method
from lorakit.lowrank import LoraFactors


@merge_method(
    "linear",
    paper="Model soups: averaging weights of multiple fine-tuned models",
    url="https://arxiv.org/abs/2203.05482",
    exact=True,
    needs_delta=False,
)
def linear(factors: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """Σ w_i·s_i·B_i@A_i exactly: the weight and scale go into B."""
    return concat(factors, weights, into="B")
