"""Rank selection and truncated SVD of one weight delta (exact, or randomized range finder).

For ΔW with singular values σ₁ ≥ σ₂ ≥ …, the rank-k truncation keeps energy
E(k) = Σ_{i≤k} σᵢ² / ‖ΔW‖_F² and has relative Frobenius error √(1 − E(k)) (Eckart–Young). The
randomized path (Halko, Martinsson & Tropp 2011: Gaussian sketch with oversampling, power
iterations with re-orthonormalisation) returns U_k S_k V_kᵀ = P·ΔW for an orthogonal projector P,
so the same identity gives its error exactly from the exact ‖ΔW‖_F².
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.errors import ConfigError

SVD_METHODS = ("auto", "exact", "randomized")


@dataclass(frozen=True, kw_only=True)
class RankRule:
    """How many singular directions to keep per module: one of rank / energy / ratio, optionally capped."""

    rank: int | None = None
    """Keep exactly this rank (or the module's full rank if smaller)."""
    energy: float | None = None
    """Keep the smallest rank whose Σσ² reaches this fraction of ‖ΔW‖_F² (PHLoRA's energy)."""
    ratio: float | None = None
    """Keep this fraction of the module's full rank min(d_out, d_in)."""
    max_rank: int | None = None
    """Never more than this rank (with energy or ratio; alone it acts as rank)."""

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "energy", "ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of --rank, --energy, --ratio (got {', '.join(given)}).")
        for name in ("rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("energy", "ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}.")

    def fixed(self, full: int) -> int | None:
        """The rank when it does not depend on the spectrum (None for an energy rule)."""
        cap = self.max_rank or full
        if self.energy is not None:
            return None
        if self.ratio is not None:
            return min(cap, max(1, round(self.ratio * full)), full)
        return min(self.rank or cap, cap, full)

    def choose(self, s2: torch.Tensor, total: float, full: int) -> int | None:
        """The rank for spectrum ``s2`` (σ², descending, maybe only the top part); None if more σ are needed."""
        k = self.fixed(full)
        if k is not None:
            return k
        assert self.energy is not None
        cum = torch.cumsum(s2.double(), 0) / total
        reached = torch.nonzero(cum >= self.energy - 1e-12)
        cap = min(self.max_rank or full, full)
        if len(reached):
            return min(int(reached[0]) + 1, cap)
        if s2.numel() >= cap:
            return cap
        return None


@dataclass
class Decomposition:
    B: torch.Tensor  # (out, k) = U_k·S_k
    A: torch.Tensor  # (k, in) = V_kᵀ
    energy: float  # kept fraction of ‖ΔW‖_F²
    singular_values: torch.Tensor  # the leading σ computed (≥ k of them)
    full_rank: int
    method: str  # "exact" or "randomized"
    rel_error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F = √(1 − energy); measured directly when that is near 0
    total: float = 0.0  # ‖ΔW‖_F²

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def randomized_svd(
    M: torch.Tensor, k: int, *, oversample: int = 16, power_iters: int = 2, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` (U, S, Vh) of M (m, n) from a sketch of width k + oversample."""
    m, n = M.shape
    width = min(k + oversample, m, n)
    sketch = torch.randn(n, width, generator=generator, dtype=M.dtype)  # (n, w)
    Q, _ = torch.linalg.qr(M @ sketch)  # (m, w)
    for _ in range(power_iters):  # (M Mᵀ)^q sharpens the spectrum; QR each step keeps it well conditioned
        Q, _ = torch.linalg.qr(M.T @ Q)  # (n, w)
        Q, _ = torch.linalg.qr(M @ Q)  # (m, w)
    U, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # (w, w), (w,), (w, n)
    return (Q @ U)[:, :k], S[:k], Vh[:k]


def decompose(
    delta: torch.Tensor, rule: RankRule, method: str = "auto", generator: torch.Generator | None = None
) -> Decomposition:
    """Truncated SVD of an (out, in) ``delta`` at the rank ``rule`` picks."""
    M = delta.float()
    full = min(M.shape)
    total = float(torch.linalg.vector_norm(M)) ** 2
    if total == 0.0:  # unchanged weight (only the bias moved): a rank-1 zero pair
        zero = torch.zeros(1)
        return Decomposition(M.new_zeros(M.shape[0], 1), M.new_zeros(1, M.shape[1]), 0.0, zero, full, "exact", 0.0)
    guess = rule.fixed(full) or min(32, full)
    use_random = method == "randomized" or (method == "auto" and guess <= full // 4)
    while use_random:
        U, S, Vh = randomized_svd(M, min(guess, full), generator=generator)
        k = rule.choose(S.square(), total, full)
        if k is not None and k <= S.numel():
            return _result(M, U, S, Vh, k, total, "randomized")
        guess *= 2  # the energy target lies beyond the sketch: widen it, or fall back to the exact SVD
        use_random = method == "randomized" or guess <= full // 4
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = rule.choose(S.square(), total, full)
    assert k is not None  # the whole spectrum is known
    return _result(M, U, S, Vh, k, total, "exact")


def _result(
    M: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, total: float, how: str
) -> Decomposition:
    kept = float(S[:k].double().square().sum())
    energy = min(1.0, kept / total)
    B, A = (U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous()  # (out, k), (k, in)
    # Eckart–Young (and P·M for the randomized projection P): the error is √(1 − E); near E = 1 that
    # formula loses its digits to rounding, so there it is measured
    near_exact = energy >= 0.999
    error = float(torch.linalg.matrix_norm(M - B @ A)) / math.sqrt(total) if near_exact else math.sqrt(1.0 - energy)
    return Decomposition(B, A, energy, S.detach().clone(), min(M.shape), how, error, total)
