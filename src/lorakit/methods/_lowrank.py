"""Low-rank factor algebra shared by methods: exact SVD factorisation and rank truncation."""

from __future__ import annotations

import torch

from lorakit.methods._api import LoraFactors


def factorize(delta: torch.Tensor, rank: int) -> LoraFactors:
    """Best rank-``rank`` approximation (Eckart–Young) of an (out, in) delta as B @ A, scale 1."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    k = min(rank, S.numel())
    B = U[:, :k] * S[:k]  # (out, k)
    return LoraFactors(Vh[:k].to(delta.dtype), B.to(delta.dtype), 1.0)


def truncate(f: LoraFactors, rank: int) -> LoraFactors:
    """Best rank-``rank`` approximation of scale·B@A from the factors alone (QR, then an r×r SVD)."""
    if rank >= f.A.shape[0]:
        return f
    Qb, Rb = torch.linalg.qr(f.B.float())  # Qb (out, r), Rb (r, r)
    Qa, Ra = torch.linalg.qr(f.A.float().T)  # Qa (in, r), Ra (r, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # core (r, r)
    B = (Qb @ U[:, :rank]) * S[:rank]  # (out, rank)
    A = Vh[:rank] @ Qa.T  # (rank, in)
    return LoraFactors(A.to(f.A.dtype), B.to(f.B.dtype), f.scale)
