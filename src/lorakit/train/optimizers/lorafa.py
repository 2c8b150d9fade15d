"""LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning — https://arxiv.org/abs/2308.03303
Update: A frozen; B follows AdamW on the projected gradient g_B·(AAᵀ)⁻¹/s², as PEFT's ``create_lorafa_optimizer``.

The projection makes the low-rank step s·g̃_B·A the best approximation of the full-weight step that
an update with this A can take. A, B and s come from the adapter's ``init_factors()`` and ``scale``,
so any method that declares an A·B pair trains with LoRA-FA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.optimizers._api import active_adapters, register_optimizer

if TYPE_CHECKING:
    from lorakit.train.loop import TrainConfig


def lorafa_grad(grad_B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA-FA's B gradient g_B·(AAᵀ + 1e-8·I)⁺ / s²: then s·g̃_B·A = G·Aᵀ(AAᵀ)⁻¹A, the full gradient G
    projected onto A's row space — the best step a rank-r update with this A can take."""
    AAt = A.float() @ A.float().T  # (r, r)
    eye = torch.eye(A.shape[0], device=A.device)
    return (grad_B.float() @ torch.linalg.pinv(AAt + 1e-8 * eye) / scale**2).to(grad_B.dtype)  # (out, r)


class LoraFA(torch.optim.Optimizer):
    """AdamW (bias-corrected, decoupled decay) where each B's gradient is first projected:
    g_B ← g_B·(AAᵀ + 1e-8·I)⁺ / s². Parameters without a projector get plain AdamW."""

    def __init__(
        self,
        params: list[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p, proj in zip(group["params"], group["projectors"], strict=True):
                if p.grad is None:
                    continue
                g = p.grad
                if proj is not None:
                    g = lorafa_grad(g, *proj)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def lorafa_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Freeze every A; B gets its (A, scale) projector, other trainable parameters none."""
    params: list[nn.Parameter] = []
    projectors: list[tuple[torch.Tensor, float] | None] = []
    for adapter, _ in active_adapters(model):
        factors = adapter.init_factors()
        if factors is None:
            raise ConfigError(f"LoRA-FA needs an A·B adapter; {type(adapter).__name__} has no A, B and scale.")
        A, B = factors
        A.requires_grad_(False)
        for p in adapter.parameters():
            if p.requires_grad:
                params.append(p)
                projectors.append((A.detach(), float(adapter.scale)) if p is B else None)
    return [{"params": params, "projectors": projectors}]


@register_optimizer(
    "lorafa",
    help="LoRA-FA: A frozen, B follows AdamW on the gradient projected onto A's row space.",
    paper="LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
    url="https://arxiv.org/abs/2308.03303",
)
def build(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return LoraFA(lorafa_groups(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
