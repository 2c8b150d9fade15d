"""elalora: ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning
(https://arxiv.org/abs/2504.00254) on plain ``lora`` adapters. Update rule: every ``every`` steps in the
adjustment phase, the k components of lowest importance over all modules are pruned and the k most important
modules each gain one component, so the total rank stays the budget.

- after every optimizer step (``after_optimizer_step``, the gradients still there) the importance of every
  element of A and B is updated: s(w) = |w·∂L/∂w| smoothed by EMA with its uncertainty (AdaLoRA's Ī·Ū, the
  paper's score); component i's score is the mean over its A row plus the mean over its B column;
- warm-up (steps ≤ ``t_init``), dynamic adjustment, stabilisation (the last ``t_final`` steps): in the
  adjustment phase, every ``every`` steps, the ``k`` lowest-scoring components are masked (B column := 0; never a
  module's last one, nor one grown at the previous adjustment, whose score starts at 0) and removed by rank
  surgery (outputs unchanged: they contribute 0 once masked), then the ``k`` modules with the highest mean
  component score each gain one component (zero B column: no contribution at the expansion step).

The paper's SVD form P·Λ·Q is replaced by A/B (masking a B column is its Λᵢ = 0), and its dynamic rank
scheduler (a k that changes over training) by a fixed ``k``. The budget is the attached total rank (held
constant, so it must equal it). The saved dir is an ordinary PEFT LoRA with a per-module ``rank_pattern``.
"""

from __future__ import annotations

import torch

from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._masking import check_move, check_window, due, move


@register_callback(
    "elalora",
    help="ElaLoRA: 'lora' ranks pruned and expanded by gradient importance at a constant total rank. Options: "
    "budget (= attached total rank), k (components moved each time), every, t_init, t_final, beta1, beta2.",
)
class ElaLoraAllocator(RankAllocator):
    name = "elalora"

    def __init__(
        self,
        budget: int,
        k: int = 1,
        every: int = 10,
        t_init: int = 0,
        t_final: int = 0,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        """``budget``: the total rank over all adapted modules (the attached one, held constant); ``k``:
        components pruned and modules expanded at each adjustment; ``every``: steps between adjustments;
        ``t_init`` / ``t_final``: warm-up and stabilisation steps without adjustment."""
        super().__init__(budget, beta1, beta2)
        check_ints(self.name, k=k, every=every)
        check_ints(self.name, low=0, t_init=t_init, t_final=t_final)
        self.k, self.every, self.t_init, self.t_final = k, every, t_init, t_final
        self.fresh: dict[str, int] = {}  # module -> components grown at the last adjustment (its last ones)
        # (step, component scores, pruned indices, modules grown) of every adjustment
        self.history: list[tuple[int, dict[str, torch.Tensor], dict[str, list[int]], list[str]]] = []

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        check_move(self, layers, self.k)
        check_window(self, steps, self.t_init, self.t_final)

    def after_optimizer_step(self, state: TrainState) -> None:
        layers = self.layers(state.model)
        self.update_sensitivity(layers)
        if due(state.step, self.steps, self.t_init, self.t_final, self.every):
            self.adjust(layers, state.step, state.optimizer)

    def adjust(self, layers: list[Layer], step: int, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Prune the ``k`` lowest components (mask, then remove), expand the ``k`` best modules; returns them."""
        scores = self.component_scores(layers)  # module -> (r,)
        pruned, grown = move(self, layers, scores, self.k, optimizer, protected=self.fresh)
        self.fresh = {name: grown.count(name) for name in grown}
        self.history.append((step, scores, pruned, grown))
        return grown
