"""SVD merge (Eckart & Young, 1936: best low-rank approximation) — https://doi.org/10.1007/BF02288367
Rule: ΔW = U_k Σ_k V_kᵀ of Σ_i w_i·ΔW_i, the best rank-k approximation in Frobenius norm.

k is ``rank`` (default: max r_i, like PEFT's ``combination_type="svd"``) or the fewest singular
values keeping ``energy`` of Σσ². Computed from the stacked factors (QR of B and Aᵀ, then the
SVD of a (Σr)×(Σr) core), never forming the (out, in) sum.
"""

from __future__ import annotations

from lorakit.compose._api import concat, merge_method
from lorakit.lowrank import LoraFactors


@merge_method(
    "svd",
    paper="The approximation of one matrix by another of lower rank",
    url="https://doi.org/10.1007/BF02288367",
    exact=False,
    needs_delta=False,
    default_rank="max",
)
def svd(factors: list[LoraFactors], weights: list[float]) -> LoraFactors:
    """The exact weighted sum as stacked factors; the driver truncates it to the output rank."""
    return concat(factors, weights, into="B")
