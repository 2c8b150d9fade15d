"""colora: CoLoRA's contribution-based rank allocation (PAPERS.md #105) on plain ``lora`` adapters.
Rule: r_m ∝ c_m, c_m = sqrt(mean_tokens ‖s·B_m·A_m·x‖²), Σ_m r_m = budget exactly, 1 ≤ r_m ≤ r (≤ budget with grow).

All modules train at their attached rank for ``warmup`` optimizer steps. During the last warmup step, forward hooks
on the wrapped layers measure each module's contribution — the RMS over the step's tokens of what its adapter adds
to the layer's output, ‖s·B·A·x‖ (the actual output change, so the input activations' scale counts), and that of
each rank component i, ‖s·B[:, i]‖·RMS(A[i]·x). At the end of step ``warmup`` the module contributions are
apportioned to ranks by the highest-averages (D'Hondt) rule: every module starts at 1, then each further unit of
budget goes to the module with the largest c_m / (r_m + 1) that is below its cap (the attached r; with ``grow``,
no cap). Each module is then changed by rank surgery: its lowest-contribution components are pruned (the pruning
itself changes the output by what they added; the removal equals zeroing their B columns, to 1e-6) or components
with zero B columns are grown (outputs unchanged). The pattern is kept as ``pattern`` / :func:`rank_pattern`,
and the saved adapter's PEFT ``rank_pattern`` carries it; the paper's image-restoration use is the recipe
``lorakit/recipes/image_restoration.py``, which fine-tunes with that pattern.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.inject import AdaptedLayer, active_layers
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Module -> the rank of its active adapter."""
    return {name: int(a.config.r) for name, _, a in active_layers(model)}


def apportion(scores: dict[str, float], budget: int, caps: dict[str, int]) -> dict[str, int]:
    """Ranks summing exactly to ``budget``: 1 each, then D'Hondt — each unit to the largest score/(rank + 1) among
    modules below their cap (ties: module order)."""
    if not len(scores) <= budget <= sum(caps.values()):
        raise ConfigError(f"budget {budget} must lie in [{len(scores)}, {sum(caps.values())}] for these modules.")
    ranks = dict.fromkeys(scores, 1)
    for _ in range(budget - len(scores)):
        open_ = [n for n in scores if ranks[n] < caps[n]]
        best = max(open_, key=lambda n: scores[n] / (ranks[n] + 1))  # max keeps the first of ties
        ranks[best] += 1
    return ranks


@register_callback(
    "colora",
    help="CoLoRA: after warmup steps, per-module ranks proportional to each 'lora' module's contribution "
    "‖s·B·A·x‖, summing to budget (total rank). Options: budget, warmup, grow.",
)
class CoLoraAllocator(RankAllocator):
    name = "colora"

    def __init__(self, budget: int, warmup: int = 10, grow: bool = False):
        """``budget``: total rank over all modules after the allocation; ``warmup``: optimizer steps before it;
        ``grow``: let a module's rank exceed its attached r (new components start with zero B columns)."""
        super().__init__(budget)
        check_ints(self.name, warmup=warmup)
        if not isinstance(grow, bool):
            raise ConfigError(f"colora: grow must be true or false, got {grow!r}.")
        self.warmup, self.allow_grow = warmup, grow
        self.hooks: list[Any] = []
        self.sums: dict[str, list[Any]] = {}  # module -> [Σ‖s·B·A·x‖², Σ over tokens of (s·‖B_i‖·A_i·x)² (r,), tokens]
        self.scores: dict[str, float] = {}  # module -> contribution c_m at the allocation
        self.pattern: dict[str, int] = {}  # module -> its rank after the allocation

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        if not self.allow_grow:
            super().check_budget(layers, steps)
        elif self.budget < len(layers):
            raise ConfigError(f"colora: budget={self.budget} is below one rank for each of the {len(layers)} modules.")
        self.check_schedule(steps, warmup=self.warmup)

    def on_step_begin(self, state: TrainState) -> None:
        super().on_step_begin(state)
        if state.step == self.warmup - 1:  # the last warmup step: measure its forwards
            self.measure(state.model)

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step == self.warmup:
            self.stop()
            self.allocate(self.layers(state.model), state.optimizer)

    def on_end(self, state: TrainState) -> None:
        self.stop()

    # -- the contribution measurement ---------------------------------------------------------------------------
    def measure(self, model: nn.Module) -> None:
        """Forward hooks on every wrapped layer adding up its adapter's contribution (until :meth:`stop`)."""
        self.stop()
        self.sums.clear()
        for name, wrapper, _ in self.layers(model):
            self.hooks.append(wrapper.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        @torch.no_grad()
        def hook(wrapper: nn.Module, args: tuple[Any, ...], _: Any) -> None:
            w = cast(AdaptedLayer, wrapper)
            a = cast(Lora, w.adapters[str(w.active)])
            h = L.project_in(cast(nn.Module, w.base_layer), args[0], a.A).float()  # (..., r)
            h = h.reshape(-1, h.shape[-1])  # (N, r)
            B = a.B.float() * a.scale  # (out, r)
            total = float((h @ B.T).square().sum())  # Σ_tokens ‖s·B·A·x‖²
            parts = h.square().sum(dim=0) * B.square().sum(dim=0)  # (r,): Σ_tokens (s·‖B_i‖·A_i·x)²
            old = self.sums.get(name)
            self.sums[name] = (
                [total, parts.cpu(), h.shape[0]]
                if old is None
                else [old[0] + total, old[1] + parts.cpu(), old[2] + h.shape[0]]
            )

        return hook

    def stop(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    # -- the allocation and the surgery -------------------------------------------------------------------------
    def allocate(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Apportion the budget by the measured contributions and prune / grow every module to its rank."""
        missing = [name for name, _, _ in layers if name not in self.sums]
        if missing:
            raise RuntimeError(f"colora: no contribution was measured for {missing[0]} (no forward through it).")
        self.scores = {name: (self.sums[name][0] / self.sums[name][2]) ** 0.5 for name, _, _ in layers}
        caps = {name: self.budget if self.allow_grow else int(a.config.r) for name, _, a in layers}
        self.pattern = apportion(self.scores, self.budget, caps)
        for name, wrapper, a in layers:
            r, new = int(a.config.r), self.pattern[name]
            if new > r:
                self.grow(wrapper, name, new - r, optimizer)
            elif new < r:  # the highest-contribution components, in their order
                keep = self.sums[name][1].argsort(descending=True, stable=True)[:new].sort().values
                with torch.no_grad():
                    dropped = torch.ones(r, dtype=torch.bool)
                    dropped[keep] = False
                    a.B[:, dropped.to(a.B.device)] = 0.0  # the pruning: these components add nothing from here
                self.prune(wrapper, name, keep, optimizer)  # their removal: outputs unchanged
        self.sums.clear()
        return self.pattern
