"""The base every budgeted rank allocator on ``lora`` adapters extends: its options validated, the model checked
before the first step (clear errors for a budget the attached adapters cannot fit), resuming refused (the
scores live in the callback, not in checkpoints), and the per-component bookkeeping they share — sensitivity
per LoRA component, pruning and growing modules (rank surgery of train/callbacks/_rank.py) with the
sensitivity tables cut or padded alike.

A subclass sets ``name`` and ``method`` (the adapter class it works on; ``Lora`` by default, matched exactly so a
subclass method with other parameters is refused), overrides :meth:`check_budget` where its budget means
something other than "the total rank at the end, one per module at least, the attached capacity at most",
and does its work in the loop's hooks.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import AdaptedLayer, active_layers
from lorakit.methods._api import AdapterModule
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._api import Callback, TrainState
from lorakit.train.callbacks._rank import Sensitivity, add_components, keep_components

Layer = tuple[str, AdaptedLayer, Any]  # (module name, wrapper, its active adapter)


def check_ints(allocator: str, low: int = 1, **values: Any) -> None:
    """A ConfigError naming the first of ``values`` that is not an integer >= ``low``."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{allocator}: {key} must be an integer >= {low}, got {value!r}.")


def check_fraction(allocator: str, **values: Any) -> None:
    """A ConfigError naming the first of ``values`` that is not a number in [0, 1]."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{allocator}: {key} must be a number in [0, 1], got {value!r}.")


class RankAllocator(Callback):
    """Budget, check before the first step, resume refused, and rank surgery with its bookkeeping."""

    name: ClassVar[str] = "allocator"
    method: ClassVar[type[AdapterModule]] = Lora

    def __init__(self, budget: int, beta1: float = 0.85, beta2: float = 0.85):
        check_ints(self.name, budget=budget)
        self.budget = budget
        self.sensitivity = Sensitivity(beta1, beta2)
        self.checked = False
        self.steps = 0  # the run's optimizer steps, set by the check

    # -- the adapters and the check before training -------------------------------------------------------
    def layers(self, model: nn.Module) -> list[Layer]:
        """(module, wrapper, adapter) of every wrapped layer with an active adapter, which must be ``method``."""
        found = []
        for name, wrapper, adapter in active_layers(model):
            if type(adapter) is not self.method:
                want = self.method.method_name
                raise ConfigError(
                    f"the {self.name} allocator works on {want!r} adapters (their rank dimension), but {name} has "
                    f"a {type(adapter).method_name!r} adapter; attach method {want!r} (lorakit train --method {want})."
                )
            found.append((name, wrapper, adapter))
        return found

    def on_step_begin(self, state: TrainState) -> None:
        if not self.checked:
            if state.step > 0:
                raise ConfigError(
                    f"{self.name}: a resumed run cannot continue the allocation (its scores and changed shapes are "
                    "not in the checkpoint yet); train again without --resume."
                )
            self.check(state.model, state.config.steps)

    def check(self, model: nn.Module, steps: int) -> None:
        """ConfigErrors for a model or run the allocator cannot work on (before training starts)."""
        layers = self.layers(model)
        if not layers:
            want = self.method.method_name
            raise ConfigError(f"the {self.name} allocator found no active adapter; attach method {want!r} first.")
        self.steps = steps
        self.check_budget(layers, steps)
        self.checked = True

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        """Default: the budget is the total rank at the end, between one per module and the attached capacity."""
        capacity, n = self.total_rank(layers), len(layers)
        if self.budget > capacity:
            raise ConfigError(
                f"{self.name}: budget={self.budget} exceeds the attached capacity (total rank {capacity} over {n} "
                "modules); lower budget or attach a larger r."
            )
        if self.budget < n:
            raise ConfigError(f"{self.name}: budget={self.budget} is below one rank for each of the {n} modules.")

    def check_schedule(self, steps: int, **ends: int) -> None:
        """A ConfigError when a step option (``t_init=...``) falls at or after the run's last step."""
        for key, value in ends.items():
            if value >= steps:
                raise ConfigError(
                    f"{self.name}: {key}={value} is at or after the end of the {steps}-step run, so the schedule "
                    f"would end after training ends; lower {key} or raise steps."
                )

    @staticmethod
    def total_rank(layers: list[Layer]) -> int:
        return sum(int(a.config.r) for _, _, a in layers)

    # -- per-component sensitivity ----------------------------------------------------------------------------
    def update_sensitivity(self, layers: list[Layer]) -> None:
        """Fold this step's |p·∇p| of every A and B into the EMA tables (keys ``module.A``, ``module.B``)."""
        for name, _, a in layers:
            for key, p in (("A", a.A), ("B", a.B)):
                self.sensitivity.update(f"{name}.{key}", p.detach(), p.grad)

    def component_scores(self, layers: list[Layer]) -> dict[str, torch.Tensor]:
        """Module -> (r,) score of each rank component: mean Ī·Ū of its A row plus that of its B column (zeros for
        a module not scored yet)."""
        s, out = self.sensitivity, {}
        for name, _, a in layers:
            if f"{name}.A" not in s.avg:
                out[name] = torch.zeros(a.config.r)
                continue
            out[name] = (s.score(f"{name}.A").float().mean(dim=1) + s.score(f"{name}.B").float().mean(dim=0)).cpu()
        return out

    # -- rank surgery with the tables kept in step -----------------------------------------------------------
    def prune(
        self, wrapper: AdaptedLayer, name: str, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None
    ) -> AdapterModule:
        """Keep only components ``keep`` (indices) of the active adapter of ``wrapper``; the tables alike."""
        adapter = cast(AdapterModule, wrapper.adapters[str(wrapper.active)])
        new = keep_components(adapter, wrapper.base_layer, keep, optimizer)
        wrapper.adapters[str(wrapper.active)] = new
        for key, dim in (("A", 0), ("B", 1)):
            for table in (self.sensitivity.avg, self.sensitivity.unc):
                if (t := table.get(f"{name}.{key}")) is not None:
                    table[f"{name}.{key}"] = t.index_select(dim, keep.to(t.device))
        return new

    def grow(self, wrapper: AdaptedLayer, name: str, k: int, optimizer: torch.optim.Optimizer | None) -> AdapterModule:
        """``k`` more components (contributing nothing: B columns zero) on the active adapter; tables padded with 0."""
        adapter = cast(AdapterModule, wrapper.adapters[str(wrapper.active)])
        new = add_components(adapter, wrapper.base_layer, k, optimizer)
        wrapper.adapters[str(wrapper.active)] = new
        for key, dim in (("A", 0), ("B", 1)):
            for table in (self.sensitivity.avg, self.sensitivity.unc):
                if f"{name}.{key}" in table:
                    t = table[f"{name}.{key}"]
                    pad = list(t.shape)
                    pad[dim] = k
                    table[f"{name}.{key}"] = torch.cat([t, t.new_zeros(pad)], dim=dim)
        return new
