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
from lorakit.inject import AdaptedLayer, active_layers
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._api import Callback, TrainState, register_callback
from lorakit.train.callbacks._rank import Sensitivity, add_components


def _adapters(model: nn.Module) -> list[tuple[str, AdaptedLayer, Lora]]:
    """(module, wrapper, adapter) of every wrapped layer with an active adapter, which must be plain LoRA."""
    found = []
    for name, w, adapter in active_layers(model):
        if type(adapter) is not Lora:
            raise ConfigError(
                f"the increlora allocator grows the rank of plain 'lora' adapters, but {name} has a "
                f"{type(adapter).method_name!r} adapter; attach method 'lora' (lorakit train --method lora)."
            )
        found.append((name, w, adapter))
    return found


def grow(model: nn.Module, names: list[str], optimizer: torch.optim.Optimizer | None = None) -> None:
    """One more rank component on the active ``lora`` adapter of each module in ``names`` (outputs unchanged)."""
    for name, wrapper, a in _adapters(model):
        if name in names:
            wrapper.adapters[str(wrapper.active)] = add_components(a, wrapper.base_layer, 1, optimizer)


@register_callback(
    "increlora",
    help="IncreLoRA: 'lora' ranks grow one component at a time on the most important modules. Options: budget "
    "(total rank), every (steps between additions), per_step (modules grown each time), beta1, beta2.",
)
class IncreLoraAllocator(Callback):
    def __init__(self, budget: int, every: int = 10, per_step: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        """``budget``: the most total rank over all adapted modules; ``every``: optimizer steps between
        additions; ``per_step``: how many modules (the top scores) get one component at each addition."""
        for name, value in (("budget", budget), ("every", every), ("per_step", per_step)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"increlora: {name} must be a positive integer, got {value!r}.")
        self.budget, self.every, self.per_step = budget, every, per_step
        self.sensitivity = Sensitivity(beta1, beta2)
        self.checked = False
        self.history: list[tuple[int, dict[str, float], list[str]]] = []  # (step, module scores, modules grown)

    def on_step_begin(self, state: TrainState) -> None:
        if not self.checked:
            if state.step > 0:
                raise ConfigError(
                    "increlora: a resumed run cannot continue the allocation (its scores and grown shapes are not "
                    "in the checkpoint yet); train again without --resume."
                )
            self.check(state.model)

    def check(self, model: nn.Module) -> None:
        """ConfigErrors for a model the budget cannot fit (before training starts)."""
        adapters = _adapters(model)
        if not adapters:
            raise ConfigError("the increlora allocator found no active adapter; attach method 'lora' first.")
        total = sum(a.config.r for _, _, a in adapters)
        if self.budget < total:
            raise ConfigError(
                f"increlora: budget={self.budget} is below the attached total rank {total} over {len(adapters)} "
                "modules; the rank only grows, so raise budget or attach a smaller r."
            )
        self.checked = True

    def after_optimizer_step(self, state: TrainState) -> None:
        adapters = _adapters(state.model)
        for name, _, a in adapters:
            for key, p in (("A", a.A), ("B", a.B)):
                self.sensitivity.update(f"{name}.{key}", p.detach(), p.grad)
        if state.step % self.every == 0:
            self.allocate(state.model, adapters, state.step, state.optimizer)

    def scores(self, adapters: list[tuple[str, AdaptedLayer, Lora]]) -> dict[str, float]:
        """Each module's mean Ī·Ū over the elements of its A and B."""
        s = self.sensitivity.score
        return {
            name: float(torch.cat([s(f"{name}.A").reshape(-1), s(f"{name}.B").reshape(-1)]).float().mean())
            for name, _, _ in adapters
        }

    def allocate(
        self,
        model: nn.Module,
        adapters: list[tuple[str, AdaptedLayer, Lora]],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> list[str]:
        """Grow the top-``per_step`` modules by score (ties: module order) within the budget; returns them."""
        room = self.budget - sum(a.config.r for _, _, a in adapters)
        if room <= 0:
            return []
        scores = self.scores(adapters)
        ranked = sorted(scores, key=lambda n: -scores[n])  # stable: ties keep module order
        chosen = ranked[: min(self.per_step, room)]
        grow(model, chosen, optimizer)
        for name in chosen:  # the new component's sensitivity starts at zero
            for key, dim in (("A", 0), ("B", 1)):
                for table in (self.sensitivity.avg, self.sensitivity.unc):
                    t = table[f"{name}.{key}"]
                    pad = list(t.shape)
                    pad[dim] = 1
                    table[f"{name}.{key}"] = torch.cat([t, t.new_zeros(pad)], dim=dim)
        self.history.append((step, scores, chosen))
        return chosen
