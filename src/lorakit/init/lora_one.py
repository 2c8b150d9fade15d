"""LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning LLMs, Provably and Efficiently — https://arxiv.org/abs/2502.01235
Update rule: B₀A₀ = [−G]_r / (γ·σ₁(G)), G = ∇_W L(W₀): s·B₀A₀ is one best rank-r full gradient step.

As the authors' code (github.com/YuanheZ/LoRA-One, direction "LoRA-One", scale "stable"): U S Vᵀ = SVD(−G),
B₀ = U_r S_r^{1/2} / √(γσ₁), A₀ = S_r^{1/2} V_rᵀ / √(γσ₁); with the authors' rsLoRA scaling s = α/√r, α = 16
(set them on the method), s·B₀A₀ = η·[−G]_r with step η = s/(γσ₁). The base weight is NOT shifted: the model
starts one rank-r gradient step away from the base, as the paper intends (so its outputs change at init). The
paper's preconditioned training is the ``lora_one`` method, which starts from this init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._api import InitContext, InitFactors, register_init
from lorakit.init._calib import as_batches, full_gradients


@dataclass(frozen=True, kw_only=True)
class LoraOneOptions:
    gamma: float = 128.0
    """γ: B₀A₀ = [−G]_r/(γσ₁), so the initial step's top singular value is s/γ (the authors' 128)."""

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ConfigError(f"lora_one: gamma must be > 0, got {self.gamma!r}.")


def from_gradient(grad: torch.Tensor, r: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A (r, in), B (out, r)) with B = U_r S_r^½/√(γσ₁), A = S_r^½ V_rᵀ/√(γσ₁), U S Vᵀ = SVD(−G); None for G = 0."""
    U, S, Vh = torch.linalg.svd(-grad.float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
    if not float(S[0]) > 0:
        return None  # no gradient reaches this layer: nothing to align with
    c = 1.0 / math.sqrt(gamma * float(S[0]))
    root = S[:r].sqrt()  # (r,)
    return root[:, None] * Vh[:r] * c, U[:, :r] * root * c


@register_init(
    "lora_one",
    options=LoraOneOptions,
    paper="LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning Large Language Models",
    url="https://arxiv.org/abs/2502.01235",
    methods=("lora", "dora", "lora_one"),
    calibration=True,
    identity_at_init=False,  # the init IS one (rank-r) gradient step; the base is not shifted
    peft=lambda _: {"init_lora_weights": True},  # PEFT has no LoRA-One: the saved dir is a plain LoRA
)
def lora_one(ctx: InitContext, opts: LoraOneOptions) -> dict[str, InitFactors]:
    """G per targeted module from the calibration batches, then A, B from its SVD; a zero G keeps the random init."""
    for name, t in ctx.targets.items():
        d_in, d_out = L.dims(t.base)
        if t.r > min(d_in, d_out):
            raise ConfigError(
                f"lora_one r={t.r} exceeds the rank of {name} with d_in={d_in}, d_out={d_out} "
                f"({min(d_in, d_out)}); lower r or leave that layer out of targets."
            )
    rank = max(t.r for t in ctx.targets.values())
    data = as_batches(ctx.batches, need_labels=True, min_rows=rank, where="lora_one")
    grads = full_gradients(ctx.model, list(ctx.targets), data)
    out = {}
    for name, t in ctx.targets.items():
        factors = from_gradient(grads[name], t.r, opts.gamma)
        if factors is not None:
            out[name] = InitFactors(*factors)
    return out
