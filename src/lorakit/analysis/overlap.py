"""How much two adapters write into the same directions, per module, from their factors.

- Subspace overlap: with U_i (out, r_i) an orthonormal basis of the column space of ΔW_i, the
  cosines of the principal angles between col(ΔW_i) and col(ΔW_j) are the singular values of
  U_iᵀU_j; the overlap is their mean square, ‖U_iᵀU_j‖_F² / min(r_i, r_j) ∈ [0, 1]
  (1: one space contains the other; 0: orthogonal column spaces).
- Interference (the LoRI-style check): ‖ΔW_iᵀ ΔW_j‖_F / (‖ΔW_i‖_F ‖ΔW_j‖_F) ∈ [0, 1]. With
  G_i = A_iA_iᵀ and M = B_iᵀB_j, ‖ΔW_iᵀΔW_j‖_F² = s_i² s_j² · Σ (G_i M) ∘ (M G_j) and
  ‖ΔW_i‖_F² = s_i² · Σ (B_iᵀB_i) ∘ G_i, so only r×r matrices are formed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from lorakit.analysis.spectra import delta_svd
from lorakit.errors import AdapterFormatError
from lorakit.io.factors import AdapterFactors
from lorakit.lowrank import LoraFactors

RTOL = 1e-7  # singular values below RTOL·σ₁ do not span the column space


def column_basis(f: LoraFactors, rtol: float = RTOL) -> torch.Tensor:
    """Orthonormal basis (out, rank) of col(scale·B@A), float64; (out, 0) for a zero delta."""
    U, S, _ = delta_svd(f)
    if S.numel() == 0 or S[0] <= 0:
        return U[:, :0]
    return U[:, rtol * S[0] < S]


def principal_cosines(Ui: torch.Tensor, Uj: torch.Tensor) -> torch.Tensor:
    """cos θ_1 ≥ … of the principal angles between span(Ui) and span(Uj) (orthonormal columns)."""
    return torch.linalg.svdvals(Ui.T @ Uj).clamp(max=1.0)  # (min(r_i, r_j),)


def subspace_overlap(fi: LoraFactors, fj: LoraFactors) -> float:
    """Mean cos² of the principal angles between the column spaces of the two deltas (nan if either is 0)."""
    cos = principal_cosines(column_basis(fi), column_basis(fj))
    return float(cos.square().mean()) if cos.numel() else math.nan


def _fro2(f: LoraFactors) -> torch.Tensor:
    A, B = f.A.double(), f.B.double()
    return f.scale**2 * ((B.T @ B) * (A @ A.T)).sum()


def interference(fi: LoraFactors, fj: LoraFactors) -> float:
    """‖ΔW_iᵀ ΔW_j‖_F / (‖ΔW_i‖_F ‖ΔW_j‖_F) from the factors (nan if either delta is 0)."""
    Ai, Bi, Aj, Bj = fi.A.double(), fi.B.double(), fj.A.double(), fj.B.double()
    Gi, Gj, M = Ai @ Ai.T, Aj @ Aj.T, Bi.T @ Bj  # (r_i, r_i), (r_j, r_j), (r_i, r_j)
    cross2 = (fi.scale * fj.scale) ** 2 * ((Gi @ M) * (M @ Gj)).sum()
    norms2 = _fro2(fi) * _fro2(fj)
    if norms2 <= 0:
        return math.nan
    return float((cross2.clamp(min=0) / norms2).sqrt())


@dataclass
class Comparison:
    """Overlap and interference of this adapter with one other adapter, per shared module."""

    other: str
    overlap: dict[str, float]  # module -> mean cos² of principal angles
    interference: dict[str, float]  # module -> ‖ΔW_iᵀΔW_j‖_F / (‖ΔW_i‖_F ‖ΔW_j‖_F)
    only_here: list[str] = field(default_factory=list)  # modules the other adapter lacks
    only_there: list[str] = field(default_factory=list)  # modules only the other adapter has

    @property
    def mean_overlap(self) -> float:
        return _mean(self.overlap.values())

    @property
    def mean_interference(self) -> float:
        return _mean(self.interference.values())


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def compare(a: AdapterFactors, b: AdapterFactors, name: str) -> Comparison:
    """Overlap and interference of ``a`` with ``b`` (named ``name``) on the modules both adapt."""
    shared = [m for m in a.factors if m in b.factors]
    overlap, inter = {}, {}
    for m in shared:
        fa, fb = a.factors[m], b.factors[m]
        if fa.B.shape[0] != fb.B.shape[0] or fa.A.shape[1] != fb.A.shape[1]:
            raise AdapterFormatError(
                f"{name}: module {m} has ΔW of shape {(fb.B.shape[0], fb.A.shape[1])}, but the analysed adapter has "
                f"{(fa.B.shape[0], fa.A.shape[1])}; compare adapters trained on the same base."
            )
        overlap[m], inter[m] = subspace_overlap(fa, fb), interference(fa, fb)
    return Comparison(
        name, overlap, inter, [m for m in a.factors if m not in b.factors], [m for m in b.factors if m not in a.factors]
    )
