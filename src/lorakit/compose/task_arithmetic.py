"""Task arithmetic (Ilharco et al., 2023: Editing Models with Task Arithmetic) — https://arxiv.org/abs/2212.04089
Rule: ΔW = λ·Σ_i w_i·ΔW_i (task vectors τ_i = ΔW_i; negative w_i subtracts a task).

For LoRA task vectors this is exact on the factors (rank Σ r_i), so no (out, in) matrix is
formed; it equals PEFT's ``merge_utils.task_arithmetic`` applied to the deltas, times λ.
"""

from __future__ import annotations

from lorakit.compose._api import concat, merge_method
from lorakit.lowrank import LoraFactors


@merge_method(
    "task_arithmetic",
    paper="Editing Models with Task Arithmetic",
    url="https://arxiv.org/abs/2212.04089",
    exact=True,
    needs_delta=False,
)
def task_arithmetic(factors: list[LoraFactors], weights: list[float], *, lam: float = 1.0) -> LoraFactors:
    """λ·Σ w_i·s_i·B_i@A_i exactly."""
    return concat(factors, [lam * w for w in weights], into="B")
