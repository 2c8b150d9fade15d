"""Spectrum of one low-rank delta ΔW = scale·B@A and the statistics read off it, from the factors alone.

With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = scale · Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the r×r
core C = R_B R_Aᵀ = U_c Σ V_cᵀ gives ΔW = (Q_B U_c) (|scale|·Σ) (sign·V_cᵀ Q_Aᵀ): no (out, in) matrix is
ever formed. For singular values σ₁ ≥ … ≥ σ_r:

- energy curve      E(k) = Σ_{i≤k} σᵢ² / Σᵢ σᵢ²   (fraction of ‖ΔW‖_F² kept by the best rank-k approximation)
- effective rank    exp(H(p)), p_i = σᵢ / Σⱼ σⱼ     (Roy & Vetterli, "The effective rank: a measure of effective
                    dimensionality", EUSIPCO 2007; p uses σ, not σ²)
- stable rank       ‖ΔW‖_F² / ‖ΔW‖₂² = Σᵢ σᵢ² / σ₁²
- parameter count   numel(A) + numel(B) = r·(in + out)

A zero delta (a freshly initialised adapter) has σ = 0: its energy curve is all zeros and both
ranks are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.lowrank import LoraFactors, factor_svd


def delta_svd(f: LoraFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U (out, k), S (k,), Vh (k, in)) of scale·B@A in float64, k = min(r, out, in)."""
    return factor_svd(f, torch.float64)


def singular_values(f: LoraFactors) -> torch.Tensor:
    """σ₁ ≥ … ≥ σ_k of scale·B@A (float64, k = min(r, out, in))."""
    return delta_svd(f)[1]


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """E(k) = Σ_{i≤k} σᵢ² / Σᵢ σᵢ² for k = 1..len(s) (all zeros when every σ is 0)."""
    s2 = s.double().square()
    total = s2.sum()
    return torch.cumsum(s2, 0) / total if total > 0 else torch.zeros_like(s2)


def rank_for_energy(s: torch.Tensor, fraction: float) -> int:
    """Smallest k with E(k) ≥ fraction (0 for a zero delta)."""
    curve = energy_curve(s)
    if curve.numel() == 0 or curve[-1] <= 0:
        return 0
    return int(torch.searchsorted(curve, torch.tensor(fraction - 1e-12, dtype=curve.dtype)).item()) + 1


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ / Σσ (0·log 0 = 0; 0 for a zero delta)."""
    s = s.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖₂² = Σσ² / σ₁² (0 for a zero delta)."""
    s = s.double()
    if s.numel() == 0 or s.max() <= 0:
        return 0.0
    return float(s.square().sum() / s.max().square())


@dataclass
class Spectrum:
    """Spectral statistics of one module's delta."""

    rank: int  # r of the factors
    shape: tuple[int, int]  # ΔW as (out, in)
    params: int  # numel(A) + numel(B)
    singular_values: list[float]  # σ₁ ≥ … ≥ σ_k
    energy: list[float]  # E(1..k)
    effective_rank: float
    stable_rank: float
    fro_norm: float  # ‖ΔW‖_F
    rank_90: int  # smallest k with E(k) ≥ 0.90
    rank_99: int  # smallest k with E(k) ≥ 0.99


def spectrum(f: LoraFactors) -> Spectrum:
    """All spectral statistics of scale·B@A, from an r×r SVD."""
    s = singular_values(f)
    return Spectrum(
        rank=int(f.A.shape[0]),
        shape=(int(f.B.shape[0]), int(f.A.shape[1])),
        params=f.A.numel() + f.B.numel(),
        singular_values=s.tolist(),
        energy=energy_curve(s).tolist(),
        effective_rank=effective_rank(s),
        stable_rank=stable_rank(s),
        fro_norm=float(s.square().sum().sqrt()),
        rank_90=rank_for_energy(s, 0.90),
        rank_99=rank_for_energy(s, 0.99),
    )
