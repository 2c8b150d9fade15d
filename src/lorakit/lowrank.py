"""The plain low-rank form of an update and its algebra: SVDs from factors, truncation.

The dependency-light core of lorakit: it imports torch and nothing else from lorakit, so extraction,
merging, analysis and serving can use it without loading the method registry or transformers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LoraFactors(NamedTuple):
    """Plain low-rank form of an update: ΔW = scale · B @ A in (out, in) orientation."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float


def factorize(delta: torch.Tensor, rank: int) -> LoraFactors:
    """Best rank-``rank`` approximation (Eckart–Young) of an (out, in) delta as B @ A, scale 1."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    k = min(rank, S.numel())
    B = U[:, :k] * S[:k]  # (out, k)
    return LoraFactors(Vh[:k].to(delta.dtype), B.to(delta.dtype), 1.0)


def factor_svd(f: LoraFactors, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD (U (out, k), S (k,), Vh (k, in)) of scale·B@A from the factors alone, k = min(out, in, r).

    B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), so scale·B@A = Q_b (scale·R_b R_aᵀ) Q_aᵀ and the SVD of that
    small core gives the SVD of the product; no (out, in) matrix is formed.
    """
    Qb, Rb = torch.linalg.qr(f.B.to(dtype) * f.scale)  # Qb (out, p), Rb (p, r), p = min(out, r)
    Qa, Ra = torch.linalg.qr(f.A.to(dtype).T)  # Qa (in, q), Ra (q, r), q = min(in, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (p, q)
    return Qb @ U, S, Vh @ Qa.T


def truncate(f: LoraFactors, rank: int) -> LoraFactors:
    """Best rank-``rank`` approximation of scale·B@A from the factors alone (see :func:`factor_svd`)."""
    if rank >= f.A.shape[0]:
        return f
    U, S, Vh = factor_svd(LoraFactors(f.A, f.B, 1.0), torch.float32)
    B = U[:, :rank] * S[:rank]  # (out, rank)
    return LoraFactors(Vh[:rank].to(f.A.dtype), B.to(f.B.dtype), f.scale)


def principal(W: torch.Tensor, r: int, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (out, r), S_r (r,), Vh_r (r, in)) of the top-r SVD of W: exact, or randomized with ``niter``
    subspace iterations (``torch.svd_lowrank``, PEFT's ``pissa_niter_N``)."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(W, q=r, niter=niter)  # U (out, r), S (r,), V (in, r)
    return U, S, V.T


def nested_B(B: torch.Tensor, b: int, rslora: bool = False) -> torch.Tensor:
    """DyLoRA's rank-``b`` slice of a rank-r LoRA, as B (out, r) with columns ≥ b zeroed and the first b scaled
    by s_b/s_r = r/b (√(r/b) under rsLoRA): then s_r·nested_B·A = s_b·B[:, :b]·A[:b] exactly as a rank-b LoRA
    with the same alpha, and components ≥ b get zero gradients (in A too, since their columns of B are zero)."""
    r = B.shape[1]
    if not 1 <= b <= r:
        raise ValueError(f"rank limit must be in [1, {r}], got {b!r}.")
    keep = torch.zeros(r, dtype=B.dtype, device=B.device)  # (r,)
    keep[:b] = (r / b) ** 0.5 if rslora else r / b
    return B * keep  # (out, r)
