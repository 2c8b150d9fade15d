"""lora2: LoRA² — Multi-Scale Low-Rank Approximations for Fine-Tuning Large Language Models
(https://arxiv.org/abs/2408.06854), on plain ``lora`` adapters. Each module's r components are two LoRAs,
ΔW = s·(B₁A₁ + B₂A₂) with A₁ = A[:h], A₂ = A[h:], B₁ = B[:, :h], B₂ = B[:, h:], h = ⌈r/2⌉, trained in mutually
orthogonal planes by the regulariser R = orth·(‖A₁A₂ᵀ‖_F² + ‖B₁ᵀB₂‖_F²), and pruned by importance to ``budget``:

- ``after_backward``: ∇R is added to the factors' .grad (the loop has no callback loss hook):
  ∂R/∂A₁ = 2·orth·(A₁A₂ᵀ)A₂, ∂R/∂A₂ = 2·orth·(A₁A₂ᵀ)ᵀA₁, ∂R/∂B₁ = 2·orth·B₂(B₁ᵀB₂)ᵀ, ∂R/∂B₂ = 2·orth·B₁(B₁ᵀB₂);
- ``after_optimizer_step`` (step k, gradients still there): the sensitivity Ī·Ū of every A and B element is updated
  (AdaLoRA's EMA β₁ and uncertainty β₂); a component's score is its A row's mean plus its B column's mean
  (``component_scores``). Every ``delta_t`` steps after ``t_init`` the components outside the global top-b(k)
  are masked (their B column := 0, kept 0 after every later step), b(k) the cubic schedule from the attached
  total rank down to ``budget`` (AdaLoRA eq. 13); at k = T − t_final exactly ``budget`` components are kept.
  Each module keeps its best component at least (a saved LoRA has rank >= 1).
- ``on_end``: the masked components are removed (rank surgery: smaller A/B, PEFT ``rank_pattern``); they had zero
  B columns, so the outputs are unchanged.

Left out of the paper: its SVD form P·Λ·Q per LoRA (a plain LoRA has no Λ, so a whole B·A component is the
pruned unit) and its cheaper importance estimate (AdaLoRA's sensitivity is used instead).
"""

from __future__ import annotations

import math

import torch

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._rank import cubic_budget, top_k


def orth_penalty(A: torch.Tensor, B: torch.Tensor, split: int) -> torch.Tensor:
    """‖A₁A₂ᵀ‖_F² + ‖B₁ᵀB₂‖_F² of one module, its components split at ``split`` (A (r, in), B (out, r))."""
    a = A[:split] @ A[split:].T  # (h, r−h)
    b = B[:, :split].T @ B[:, split:]  # (h, r−h)
    return (a * a).sum() + (b * b).sum()


@torch.no_grad()
def orth_grads(A: torch.Tensor, B: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂A, ∂/∂B) of :func:`orth_penalty`, in closed form (shapes of A and B)."""
    A1, A2, B1, B2 = A[:split], A[split:], B[:, :split], B[:, split:]
    a, b = A1 @ A2.T, B1.T @ B2  # (h, r−h) each
    gA = torch.cat([2 * a @ A2, 2 * a.T @ A1])  # (r, in)
    gB = torch.cat([2 * B2 @ b.T, 2 * B1 @ b], dim=1)  # (out, r)
    return gA, gB


@register_callback(
    "lora2",
    help="LoRA²: two orthogonal LoRAs per 'lora' module (regulariser orth), importance-pruned to budget (total rank) "
    "on a cubic schedule. Options: budget, orth, t_init, t_final, delta_t, beta1, beta2.",
)
class Lora2Allocator(RankAllocator):
    name = "lora2"

    def __init__(
        self,
        budget: int,
        orth: float = 0.1,
        t_init: int = 0,
        t_final: int = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        """``budget``: total rank over all modules at the end; ``orth``: weight of the orthogonality regulariser;
        ``t_init`` / ``t_final``: steps before / after the budget falls; ``delta_t``: steps between allocations."""
        super().__init__(budget, beta1, beta2)
        check_ints(self.name, low=0, t_init=t_init, t_final=t_final)
        check_ints(self.name, delta_t=delta_t)
        if isinstance(orth, bool) or not isinstance(orth, (int, float)) or not math.isfinite(orth) or orth < 0:
            raise ConfigError(f"lora2: orth must be a finite number >= 0, got {orth!r}.")
        self.orth, self.t_init, self.t_final, self.delta_t = float(orth), t_init, t_final, delta_t
        self.initial = 0  # the attached total rank, set by the check
        self.splits: dict[str, int] = {}  # module -> h: components [0, h) are the first LoRA, [h, r) the second
        self.masks: dict[str, torch.Tensor] = {}  # module -> kept components (bool, (r,))
        self.history: list[tuple[int, int]] = []  # (step, components kept) at each allocation

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        super().check_budget(layers, steps)
        if self.t_init + self.t_final >= steps:
            raise ConfigError(
                f"lora2: t_init + t_final = {self.t_init + self.t_final} leaves no step of the {steps}-step run to "
                "lower the budget in; the schedule would end after training ends. Lower them or raise steps."
            )
        small = [name for name, _, a in layers if a.config.r < 2]
        if small:
            raise ConfigError(f"lora2: {small[0]} has rank 1; two LoRAs need r >= 2 per module, attach a larger r.")
        self.initial = self.total_rank(layers)
        self.splits = {name: math.ceil(a.config.r / 2) for name, _, a in layers}

    def after_backward(self, state: TrainState) -> None:
        if self.orth == 0:
            return
        for name, _, a in self.layers(state.model):
            gA, gB = orth_grads(a.A.detach(), a.B.detach(), self.splits[name])
            for p, g in ((a.A, gA), (a.B, gB)):
                if p.requires_grad:
                    p.grad = self.orth * g if p.grad is None else p.grad.add_(g, alpha=self.orth)

    def after_optimizer_step(self, state: TrainState) -> None:
        step, end = state.step, self.steps - self.t_final
        layers = self.layers(state.model)
        if step < end:
            self.update_sensitivity(layers)
            if step > self.t_init and step % self.delta_t == 0:
                ends = {"t_init": self.t_init, "t_final": self.t_final, "total": self.steps}
                self.allocate(layers, step, cubic_budget(step, initial=self.initial, final=self.budget, **ends))
        elif step == end:
            self.update_sensitivity(layers)
            self.allocate(layers, step, self.budget)
            self.sensitivity.reset()
        self.apply(layers)

    def allocate(self, layers: list[Layer], step: int, budget: int) -> None:
        """Keep the ``budget`` best-scoring components over all modules, each module's best one always (a saved
        LoRA has rank >= 1); the others are masked from now on."""
        scores = self.component_scores(layers)
        for s in scores.values():
            s[s.argmax()] = float("inf")  # (r,): one component per module first, then the global top
        self.masks = top_k(scores, budget)
        self.history.append((step, sum(int(m.sum()) for m in self.masks.values())))

    @torch.no_grad()
    def apply(self, layers: list[Layer]) -> None:
        """B columns of the masked components := 0 (they then contribute nothing)."""
        for name, _, a in layers:
            if name in self.masks:
                a.B.masked_fill_(~self.masks[name].to(a.B.device).view(1, -1), 0.0)

    def on_end(self, state: TrainState) -> None:
        """Rank surgery: every adapter keeps its unmasked components only (the others had zero B columns)."""
        for name, wrapper, _ in self.layers(state.model):
            if name in self.masks and not bool(self.masks[name].all()):
                self.prune(wrapper, name, self.masks[name].nonzero().view(-1), state.optimizer)

    def orthogonality(self, layers: list[Layer]) -> dict[str, float]:
        """Module -> ‖A₁A₂ᵀ‖_F now (the quantity the regulariser drives to 0)."""
        out = {}
        for name, _, a in layers:
            h = self.splits.get(name, math.ceil(a.config.r / 2))
            out[name] = float(torch.linalg.matrix_norm(a.A[:h].detach() @ a.A[h:].detach().T))
        return out
