"""The normalised Walsh–Hadamard transform: a fast O(n log n) op beside its dense reference.

Semantics: ``fwht(x, dim)`` = x·Hₙ along ``dim`` (n = x.shape[dim], a power of two), with Hₙ the Sylvester
Hadamard matrix divided by √n: H₁ = [1], H₂ₖ = [[Hₖ, Hₖ], [Hₖ, −Hₖ]] / √2. Hₙ is symmetric and orthogonal
(Hₙ·Hₙ = I), so the transform is its own inverse. ``hadamard(n)`` builds Hₙ densely (the reference the fast
op is tested against); ``next_pow2`` gives the padded size for widths that are not powers of two.
"""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1)."""
    return 1 << (n - 1).bit_length()


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """The dense normalised Sylvester Hadamard matrix Hₙ (n, n); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n must be a power of two, got {n}.")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)  # (2k, 2k)
    return (H / n**0.5).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x·Hₙ along ``dim`` in log₂(n) butterfly stages (differentiable; n = x.shape[dim] a power of two)."""
    n = x.shape[dim]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht: the transformed dimension must be a power of two, got {n}.")
    y = x.movedim(dim, -1)
    lead = y.shape[:-1]
    h = 1
    while h < n:
        pairs = y.reshape(*lead, n // (2 * h), 2, h)  # (..., blocks, 2, h): the two halves of each block
        a, b = pairs[..., 0, :], pairs[..., 1, :]  # (..., blocks, h)
        y = torch.stack([a + b, a - b], dim=-2).reshape(*lead, n)  # (..., n)
        h *= 2
    return (y * n**-0.5).movedim(-1, dim)
