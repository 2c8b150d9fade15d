"""dora_dynamic: DoRA: Enhancing Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution
(https://arxiv.org/abs/2405.17357) on plain ``lora`` adapters. Update rule: ΔW = s·Σᵢ cᵢ·B[:, i]·A[i, :] with
component importance sᵢ = ‖B[:, i]·A[i, :]‖_F / ‖B·A‖_F, smoothed s̄ᵢ ← β·s̄ᵢ + (1 − β)·sᵢ; the components
outside the global top-b(t) get cᵢ = 0, b(t) falling cubically from the attached total rank to ``budget``.

- after every optimizer step (``after_optimizer_step``) up to step T − ``t_final``: masked components are held
  at 0 (their B column := 0, the gate cᵢ = 0 of the paper), then the scores are updated (‖B[:, i]·A[i, :]‖_F =
  ‖B[:, i]‖·‖A[i, :]‖ for a rank-1 term; ‖B·A‖_F² = Σ (BᵀB ⊙ A·Aᵀ)); every ``every`` steps after ``t_init``,
  and at T − ``t_final``, the active components outside the top-b(t) are masked (``cubic_budget`` of
  train/callbacks/_rank.py; each module keeps its best one; a masked component never returns). After
  T − ``t_final`` exactly ``budget`` components are active and the masks are held.
- the dimensional equilibrium modulator (the paper's regulariser, weight ``reg``, 0 = off): R = the mean over
  every component of Var(A[i, :]) + Var(B[:, i]) (unbiased variances), its gradient reg·∂R/∂A, reg·∂R/∂B added
  in ``after_backward`` until the pruning ends, as the paper stops it there.
- at the end the masked components are removed by rank surgery (they contribute 0: outputs unchanged), so the
  saved dir is an ordinary PEFT LoRA whose per-module ranks sum to ``budget``.

The paper's gate cᵢ is a trained scalar per component; here the component is B[:, i]·A[i, :] alone (the gate
is 1 while active, 0 once pruned), so the saved adapter is plain LoRA.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._masking import (
    active_total,
    all_active,
    apply_masks,
    check_window,
    due,
    keep_top,
    remove_masked,
)
from lorakit.train.callbacks._rank import cubic_budget


def component_shares(A: torch.Tensor, B: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """sᵢ = ‖B[:, i]·A[i, :]‖_F / ‖B·A‖_F for A (r, in), B (out, r); shape (r,)."""
    A, B = A.detach().float(), B.detach().float()
    own = B.norm(dim=0) * A.norm(dim=1)  # (r,): ‖B[:, i]‖·‖A[i, :]‖
    total = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt()  # ‖B·A‖_F from two (r, r) Gram matrices
    return own / (total + eps)


def dimensional_equilibrium(layers: list[Layer]) -> torch.Tensor:
    """R = Σ_modules Σᵢ (Var(A[i, :]) + Var(B[:, i])) / (2·Σ_modules r): the paper's modulator, differentiable."""
    terms = [a.A.float().var(dim=1).sum() + a.B.float().var(dim=0).sum() for _, _, a in layers]
    return torch.stack(terms).sum() / (2 * sum(int(a.config.r) for _, _, a in layers))


@torch.no_grad()
def add_dimensional_equilibrium_gradient(layers: list[Layer], weight: float) -> None:
    """.grad += weight·∂R/∂p for p in A, B of every module: ∂Var(x)/∂x = 2(x − x̄)/(n − 1)."""
    n = 2 * sum(int(a.config.r) for _, _, a in layers)
    for _, _, a in layers:
        for p, dim in ((a.A, 1), (a.B, 0)):  # A's rows, B's columns
            if not p.requires_grad:
                continue
            x = p.float()
            g = 2 * (x - x.mean(dim=dim, keepdim=True)) / (x.shape[dim] - 1) * (weight / n)  # same shape as p
            p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.grad.dtype)


@register_callback(
    "dora_dynamic",
    help="DoRA (dynamic rank distribution): 'lora' ranks pruned by each component's share of ‖ΔW‖ to budget "
    "(total rank at the end), cubic schedule. Options: budget, t_init, t_final, every, beta, reg.",
)
class DoraDynamicAllocator(RankAllocator):
    name = "dora_dynamic"

    def __init__(
        self, budget: int, t_init: int = 0, t_final: int = 0, every: int = 1, beta: float = 0.85, reg: float = 0.0
    ):
        """``budget``: total rank over all adapted modules at the end; ``t_init`` / ``t_final``: steps before /
        after the budget falls; ``every``: steps between prunings; ``beta``: EMA of the scores; ``reg``: weight
        of the dimensional equilibrium modulator (0 = off)."""
        super().__init__(budget)
        check_ints(self.name, low=0, t_init=t_init, t_final=t_final)
        check_ints(self.name, every=every)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ConfigError(f"{self.name}: beta must be a number in [0, 1), got {beta!r}.")
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or reg < 0:
            raise ConfigError(f"{self.name}: reg must be a number >= 0, got {reg!r}.")
        self.t_init, self.t_final, self.every, self.beta, self.reg = t_init, t_final, every, beta, float(reg)
        self.initial = 0  # the attached total rank, set by the check
        self.scores: dict[str, torch.Tensor] = {}  # module -> (r,) smoothed share s̄
        self.masks: dict[str, torch.Tensor] = {}  # module -> (r,) active components
        self.history: list[tuple[int, int, int]] = []  # (step, b(step), active components after it)

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        super().check_budget(layers, steps)
        check_window(self, steps, self.t_init, self.t_final)
        self.initial = self.total_rank(layers)
        self.masks = all_active(layers)

    def after_backward(self, state: TrainState) -> None:
        if self.reg and state.step < self.steps - self.t_final:  # the step that ends at k+1 ≤ T − t_final
            add_dimensional_equilibrium_gradient(self.layers(state.model), self.reg)

    def after_optimizer_step(self, state: TrainState) -> None:
        layers, step, end = self.layers(state.model), state.step, self.steps - self.t_final
        apply_masks(layers, self.masks)  # the optimizer moved the masked B columns: back to 0
        if step > end:
            return
        for name, _, a in layers:
            s = component_shares(a.A, a.B).cpu()  # (r,)
            self.scores[name] = self.beta * self.scores.get(name, torch.zeros_like(s)) + (1 - self.beta) * s
        if due(step, self.steps, self.t_init, self.t_final, self.every) or step == end:
            self.allocate(layers, step)

    def allocate(self, layers: list[Layer], step: int) -> None:
        """Mask the active components outside the top b(step) of the smoothed scores."""
        ends = {"t_init": self.t_init, "t_final": self.t_final, "total": self.steps}
        b = cubic_budget(step, initial=self.initial, final=self.budget, **ends)
        self.masks = keep_top(self.scores, self.masks, min(b, active_total(self.masks)))
        apply_masks(layers, self.masks)
        self.history.append((step, b, active_total(self.masks)))

    def on_end(self, state: TrainState) -> None:
        """Rank surgery: the masked components (contributing 0) removed; the ranks sum to ``budget``."""
        if self.masks:
            remove_masked(self, self.layers(state.model), self.masks, state.optimizer)
