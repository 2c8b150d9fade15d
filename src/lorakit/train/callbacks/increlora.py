"""increlora: IncreLoRA's incremental rank allocator (https://arxiv.org/abs/2308.12043) for plain ``lora``
adapters. Training starts from the attached rank (e.g. r=1 everywhere) and the rank grows where it matters:

- after every optimizer step (``after_optimizer_step``, the gradients still there) the sensitivity Ī·Ū of every
  element of A and B is updated (:class:`~lorakit.train.callbacks._rank.Sensitivity`, EMA β₁, uncertainty β₂);
  a module's score is the mean over its A and B elements;
- every ``every`` steps the ``per_step`` highest-scoring modules each get one more rank component, while the
  total rank over all adapted modules stays ≤ ``budget`` (fewer once the budget is nearly spent, none after).

Adding a component is rank surgery (``add_components`` in train/callbacks/_rank.py): the adapter is rebuilt at
r + 1 with α rescaled so the scale α/r (α/√r with rsLoRA) is unchanged; the new A row is LoRA's init and the
new B column zero, so the model's output is unchanged at each addition; the optimizer's moments for the new
component start at zero. The saved dir is an ordinary PEFT LoRA (per-module ``rank_pattern``/``alpha_pattern``).
Bad budgets, ``every``/``per_step`` and non-LoRA adapters are ConfigErrors before the first step; the scores live
in the callback, not in checkpoints, so resuming is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback


@register_callback(
    "increlora",
    help="IncreLoRA: 'lora' ranks grow one component at a time on the most important modules. Options: budget "
    "(total rank), every (steps between additions), per_step (modules grown each time), beta1, beta2.",
)
class IncreLoraAllocator(RankAllocator):
    name = "increlora"

    def __init__(self, budget: int, every: int = 10, per_step: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        """``budget``: the most total rank over all adapted modules; ``every``: optimizer steps between
        additions; ``per_step``: how many modules (the top scores) get one component at each addition."""
        super().__init__(budget, beta1, beta2)
        check_ints(self.name, every=every, per_step=per_step)
        self.every, self.per_step = every, per_step
        self.history: list[tuple[int, dict[str, float], list[str]]] = []  # (step, module scores, modules grown)

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        total = self.total_rank(layers)
        if self.budget < total:
            raise ConfigError(
                f"increlora: budget={self.budget} is below the attached total rank {total} over {len(layers)} "
                "modules; the rank only grows, so raise budget or attach a smaller r."
            )

    def after_optimizer_step(self, state: TrainState) -> None:
        layers = self.layers(state.model)
        self.update_sensitivity(layers)
        if state.step % self.every == 0:
            self.allocate(layers, state.step, state.optimizer)

    def scores(self, layers: list[Layer]) -> dict[str, float]:
        """Each module's mean Ī·Ū over the elements of its A and B."""
        s = self.sensitivity.score
        return {
            name: float(torch.cat([s(f"{name}.A").reshape(-1), s(f"{name}.B").reshape(-1)]).float().mean())
            for name, _, _ in layers
        }

    def allocate(self, layers: list[Layer], step: int, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Grow the top-``per_step`` modules by score (ties: module order) within the budget; returns them."""
        room = self.budget - self.total_rank(layers)
        if room <= 0:
            return []
        scores = self.scores(layers)
        chosen = sorted(scores, key=lambda n: -scores[n])[: min(self.per_step, room)]  # stable: ties keep order
        for name, wrapper, _ in layers:
            if name in chosen:
                self.grow(wrapper, name, 1, optimizer)  # the new component's sensitivity starts at zero
        self.history.append((step, scores, chosen))
        return chosen


def grow(model: nn.Module, names: list[str], optimizer: torch.optim.Optimizer | None = None) -> None:
    """One more rank component on the active ``lora`` adapter of each module in ``names`` (outputs unchanged)."""
    allocator = IncreLoraAllocator(budget=1)
    for name, wrapper, _ in allocator.layers(model):
        if name in names:
            allocator.grow(wrapper, name, 1, optimizer)
