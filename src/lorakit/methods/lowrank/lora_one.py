"""LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning LLMs, Provably and Efficiently — https://arxiv.org/abs/2502.01235
Update rule: h = W₀x + s·B·A·x, B₀A₀ = [−G]_r/(γσ₁) (the ``lora_one`` init), preconditioned factor gradients.

The init alone is ``init="lora_one"`` on any A/B method (lorakit/init/lora_one.py). This method is LoRA with the
authors' defaults (rsLoRA scaling α/√r, α = 16, that init) and, with ``preconditioned``, the paper's preconditioners
applied to the factor gradients before any optimizer sees them (their Scaled-AdamW = this + AdamW):
∇_A ← (BᵀB + λI)⁻¹·∇_A, ∇_B ← ∇_B·(AAᵀ + λI)⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import register, require
from lorakit.methods.lowrank.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class LoraOneConfig(LoraConfig):
    alpha: float = 16.0
    """Scaling numerator; with rslora the update is multiplied by alpha/sqrt(r) (the authors' α = 16)."""
    rslora: bool = True
    """Rank-stabilised scaling alpha/sqrt(r), as the authors run LoRA-One."""
    init: str = "lora_one"
    """The init of A and B: LoRA-One's one-step gradient SVD (its γ in init_options={"gamma": ...})."""
    preconditioned: bool = False
    """Precondition the factor gradients: ∇_A ← (BᵀB+λI)⁻¹∇_A, ∇_B ← ∇_B(AAᵀ+λI)⁻¹ (the paper's LoRA-One with
    preconditioners; any optimizer, e.g. AdamW, then runs on the preconditioned gradients)."""
    precond_reg: float = 1e-6
    """λ, the preconditioners' ridge (the authors' 1e-6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
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
)
class LoraOne(Lora):
    """LoRA whose factors start as the scaled top-r SVD of −G and whose factor gradients may be preconditioned."""

    config: LoraOneConfig

    def lora_out(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not (self.config.preconditioned and torch.is_grad_enabled()):
            return super().lora_out(x, base)
        A, B = _Precondition.apply(self.A, self.B, self.config.precond_reg)
        h = L.project_in(base, self.dropout(x), A)  # (..., r)
        return torch.nn.functional.linear(h, B, self.b) * self.scale  # (..., out)

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        return None if self.config.preconditioned else super().fused_forward(x, base)
