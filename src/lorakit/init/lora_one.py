"""LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning LLMs, Provably and Efficiently — https://arxiv.org/abs/2502.01235
Update rule: h = W₀x + s·B·A·x, B₀A₀ = [−G]_r / (γ·σ₁(G)), G = ∇_W L(W₀): s·B₀A₀ is one best rank-r full gradient step.

As the authors' code (github.com/YuanheZ/LoRA-One, direction "LoRA-One", scale "stable"): U S Vᵀ = SVD(−G),
B₀ = U_r S_r^{1/2} / √(γσ₁), A₀ = S_r^{1/2} V_rᵀ / √(γσ₁), rsLoRA scaling s = α/√r with α = 16, γ = 128; so
s·B₀A₀ = η·[−G]_r with step η = s/(γσ₁). The base weight is NOT shifted: the model starts one rank-r gradient step
away from the base, as the paper intends (so its outputs change at init). ``preconditioned`` applies the paper's
preconditioners to the factor gradients before any optimizer sees them (their Scaled-AdamW = this + AdamW):
∇_A ← (BᵀB + λI)⁻¹·∇_A, ∇_B ← ∇_B·(AAᵀ + λI)⁻¹.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._calib import as_batches, full_gradients
from lorakit.methods._api import register, require
from lorakit.methods.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class LoraOneConfig(LoraConfig):
    alpha: float = 16.0
    """Scaling numerator; with rslora the update is multiplied by alpha/sqrt(r) (the authors' α = 16)."""
    rslora: bool = True
    """Rank-stabilised scaling alpha/sqrt(r), as the authors run LoRA-One."""
    gamma: float = 128.0
    """γ: B₀A₀ = [−G]_r/(γσ₁), so the initial step's top singular value is s/γ (the authors' 128)."""
    preconditioned: bool = False
    """Precondition the factor gradients: ∇_A ← (BᵀB+λI)⁻¹∇_A, ∇_B ← ∇_B(AAᵀ+λI)⁻¹ (the paper's LoRA-One with
    preconditioners; any optimizer, e.g. AdamW, then runs on the preconditioned gradients)."""
    precond_reg: float = 1e-6
    """λ, the preconditioners' ridge (the authors' 1e-6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.init == "default", "lora_one initialises A and B from the gradient; leave init='default'.")
        require(self.gamma > 0, f"gamma must be > 0, got {self.gamma!r}.")
        require(self.precond_reg > 0, f"precond_reg must be > 0, got {self.precond_reg!r}.")


class _Precondition(torch.autograd.Function):
    """Identity on (A, B) forward; backward returns ((BᵀB + λI)⁻¹·g_A, g_B·(AAᵀ + λI)⁻¹)."""

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(A, B)
        ctx.reg = reg
        return A.view_as(A), B.view_as(B)

    @staticmethod
    def backward(ctx: Any, gA: torch.Tensor | None, gB: torch.Tensor | None) -> tuple[Any, ...]:
        A, B = (t.float() for t in ctx.saved_tensors)  # A (r, in), B (out, r)
        eye = ctx.reg * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)  # (r, r)
        if gA is not None:
            gA = torch.linalg.solve(B.T @ B + eye, gA.float()).to(gA.dtype)  # (r, in)
        if gB is not None:
            gB = torch.linalg.solve(A @ A.T + eye, gB.float().T).T.to(gB.dtype)  # (out, r); AAᵀ is symmetric
        return gA, gB, None


@register(
    "lora_one",
    config=LoraOneConfig,
    paper="LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning Large Language Models",
    url="https://arxiv.org/abs/2502.01235",
    family="F3",
    params="r*(d_in+d_out) + (d_out if lora_bias else 0)",
    identity_at_init=False,  # the init IS one (rank-r) gradient step; the base is not shifted
    layers=("linear", "conv1d"),
    calibration=True,
)
class LoraOne(Lora):
    """LoRA whose factors start as the scaled top-r SVD of the negative full gradient −G."""

    config: LoraOneConfig

    @classmethod
    def from_base(cls, base: nn.Module, cfg: LoraConfig) -> Lora:
        d_in, d_out = L.dims(base)
        if cfg.r > min(d_in, d_out):
            raise ConfigError(
                f"lora_one r={cfg.r} exceeds the rank of a layer with d_in={d_in}, d_out={d_out} "
                f"({min(d_in, d_out)}); lower r or leave that layer out of targets."
            )
        return super().from_base(base, cfg)

    @classmethod
    def initialize(
        cls, model: nn.Module, adapters: dict[str, nn.Module], cfg: LoraOneConfig, batches: list[dict] | None
    ) -> None:
        """G per targeted module from the calibration batches, then A, B from its SVD (:meth:`set_from_gradient`)."""
        mine = {name: a for name, a in adapters.items() if isinstance(a, LoraOne)}
        rank = max(a.config.r for a in mine.values())
        data = as_batches(batches, need_labels=True, min_rows=rank, where="lora_one")
        grads = full_gradients(model, list(mine), data)
        for name, adapter in mine.items():
            adapter.set_from_gradient(grads[name])

    @torch.no_grad()
    def set_from_gradient(self, grad: torch.Tensor) -> None:
        """B = U_r S_r^½/√(γσ₁), A = S_r^½ V_rᵀ/√(γσ₁) with U S Vᵀ = SVD(−G), G (out, in); a zero G keeps the init."""
        U, S, Vh = torch.linalg.svd(-grad.float(), full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        if not float(S[0]) > 0:
            return  # no gradient reaches this layer: nothing to align with
        r, c = self.config.r, 1.0 / math.sqrt(self.config.gamma * float(S[0]))
        root = S[:r].sqrt()  # (r,)
        self.B.copy_(U[:, :r] * root * c)  # (out, r)
        self.A.copy_(root[:, None] * Vh[:r] * c)  # (r, in)

    def lora_out(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not (self.config.preconditioned and torch.is_grad_enabled()):
            return super().lora_out(x, base)
        A, B = _Precondition.apply(self.A, self.B, self.config.precond_reg)
        h = L.project_in(base, self.dropout(x), A)  # (..., r)
        return torch.nn.functional.linear(h, B, self.b) * self.scale  # (..., out)

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        return None if self.config.preconditioned else super().fused_forward(x, base)
