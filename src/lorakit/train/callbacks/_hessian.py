"""Hutchinson's estimator of a Hessian diagonal, for sensitivity-based allocators (train/callbacks/sensitivity_lora.py)
and analysis: diag(H) = E_z[z ⊙ H·z] for z with independent Rademacher (±1) entries (Bekas, Kokiopoulou & Saad,
"An estimator for the diagonal of a matrix", 2007), each H·z a Hessian-vector product by double backward, so the
Hessian is never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lorakit.errors import ConfigError


def rademacher(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor shaped like ``like`` with independent ±1 entries (drawn on the CPU, moved to ``like``'s device)."""
    bits = torch.randint(0, 2, like.shape, generator=generator)
    return (bits * 2 - 1).to(device=like.device, dtype=like.dtype)


def hutchinson_diagonal(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    samples: int = 8,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Estimates of diag(∂²L/∂p²) for each tensor p of ``params`` (each shaped like p), with L = ``loss_fn()``.

    Semantics: ``mean_s z_s ⊙ H·z_s`` over ``samples`` Rademacher draws z_s of all ``params`` at once (H the Hessian
    over all of them, cross blocks included), unbiased for the diagonal of H; entry i has variance
    Σ_{j≠i} H_ij² / samples, j over every entry of ``params``. Every p must require grad; ``loss_fn`` runs once
    (its graph is kept for the ``samples`` Hessian-vector products).
    """
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"hutchinson_diagonal: samples must be an integer >= 1, got {samples!r}.")
    if not params or any(not p.requires_grad for p in params):
        raise ConfigError("hutchinson_diagonal: every parameter must require grad (set requires_grad_(True)).")
    loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    diag = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for s in range(samples):
        zs = [rademacher(p, generator) for p in params]
        hz = torch.autograd.grad(grads, list(params), grad_outputs=zs, retain_graph=s < samples - 1, allow_unused=True)
        for d, z, h in zip(diag, zs, hz, strict=True):
            if h is not None:  # None: L is linear in p there, its Hessian block is zero
                d.add_((z * h).float(), alpha=1.0 / samples)  # z ⊙ H·z, shaped like p
    return diag
