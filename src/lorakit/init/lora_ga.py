"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation — https://arxiv.org/abs/2407.05000
Update rule: G = U S Vᵀ (sampled full gradient); A₀ = c·V[:, :r]ᵀ, B₀ = c·U[:, r:2r]; base ← W − s·B₀·A₀.

Under SGD the first step moves s·B·A by −η·s²·(B₀B₀ᵀG + G A₀ᵀA₀) = −η·s²·c²·[G]₂ᵣ, the best rank-2r
approximation of the full fine-tuning step −η·G (the paper's Theorem 3.1). "stable" scaling takes
c = d_out^{1/4}/√γ (§3.3), "gd" c = 1/s, "unit" c = 1. Directions as the authors' code: "ArB2r"
(above), "A2rBr" (A from V[:, r:2r], B from U[:, :r]), "ArBr" (odd/even interleaved). The SVD is
exact (the reference code sketches it with svd_lowrank). ``peft_variant`` reproduces PEFT 0.21's
lora_ga: B also carries the singular values (U·S) and only B gets the stable factor. The base is
rewritten so outputs are unchanged at init; saved adapters are plain LoRA of rank 2r on the original W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._api import InitContext, InitFactors, register_init
from lorakit.init._calib import as_batches, full_gradients

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit")


@dataclass(frozen=True, kw_only=True)
class LoraGAOptions:
    direction: str = "ArB2r"
    """Which singular vectors go to A and B: 'ArB2r' (A: V[:, :r], B: U[:, r:2r]), 'A2rBr' or 'ArBr'."""
    init_scale: str = "stable"
    """'stable' (A, B × d_out^{1/4}/√γ), 'gd' (A, B ÷ s: the first step equals SGD's on [G]₂ᵣ) or 'unit'."""
    stable_gamma: float = 16.0
    """γ of the stable scaling."""
    peft_variant: bool = False
    """PEFT 0.21's lora_ga: B = U·S (with singular values) and only B is scaled (for parity with PEFT)."""

    def __post_init__(self) -> None:
        for ok, message in (
            (self.direction in DIRECTIONS, f"direction must be one of {DIRECTIONS}, got {self.direction!r}."),
            (self.init_scale in SCALES, f"init_scale must be one of {SCALES}, got {self.init_scale!r}."),
            (self.stable_gamma > 0, f"stable_gamma must be > 0, got {self.stable_gamma!r}."),
        ):
            if not ok:
                raise ConfigError(f"lora_ga: {message}")


def pick(r: int, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the singular vectors for A, for B) among the top 2r."""
    idx = torch.arange(2 * r)
    if direction == "ArB2r":
        return idx[:r], idx[r:]
    if direction == "A2rBr":
        return idx[r:], idx[:r]
    return idx[1::2], idx[0::2]  # ArBr: A odd, B even


def from_gradient(grad: torch.Tensor, r: int, scale: float, opts: LoraGAOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A₀ (r, in), B₀ (out, r) from the SVD of G (out, in), as in the module docstring."""
    U, S, Vh = torch.linalg.svd(grad.float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    ia, ib = pick(r, opts.direction)
    A, B = Vh[ia], U[:, ib]  # (r, in), (out, r)
    factor = {"stable": grad.shape[0] ** 0.25 / opts.stable_gamma**0.5, "gd": 1 / scale, "unit": 1.0}[opts.init_scale]
    if not opts.peft_variant:
        return A * factor, B * factor
    B = B * S[ib] * (factor if opts.init_scale == "stable" else 1.0)
    return (A * factor, B * factor) if opts.init_scale == "gd" else (A, B)


def peft_fields(opts: LoraGAOptions) -> dict[str, Any]:
    scale = "gd_scale" if opts.init_scale == "gd" else opts.init_scale
    sub = {"direction": opts.direction, "scale": scale, "stable_gamma": opts.stable_gamma}
    return {"init_lora_weights": "lora_ga", "lora_ga_config": sub}


@register_init(
    "lora_ga",
    options=LoraGAOptions,
    paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
    url="https://arxiv.org/abs/2407.05000",
    calibration=True,
    shifts_base=True,
    peft=peft_fields,
)
def lora_ga(ctx: InitContext, opts: LoraGAOptions) -> dict[str, InitFactors]:
    """G per targeted module from the calibration batches, then A₀, B₀ and W ← W − s·B₀·A₀."""
    for name, t in ctx.targets.items():
        d_in, d_out = L.dims(t.base)
        if 2 * t.r > min(d_in, d_out):
            raise ConfigError(
                f"lora_ga takes 2r = {2 * t.r} singular vectors of the gradient, more than min(d_in, d_out) = "
                f"{min(d_in, d_out)} of {name} ({d_in}→{d_out}); lower r or leave it out."
            )
    rank = max(t.r for t in ctx.targets.values())
    data = as_batches(ctx.batches, need_labels=True, min_rows=2 * rank, where="lora_ga")
    grads = full_gradients(ctx.model, list(ctx.targets), data)
    out = {}
    for name, t in ctx.targets.items():
        A, B = from_gradient(grads[name], t.r, t.scale, opts)
        out[name] = InitFactors(A, B, shift=True)
    return out
