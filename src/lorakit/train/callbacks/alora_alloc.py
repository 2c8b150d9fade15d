"""alora_alloc: ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language Models
(https://arxiv.org/abs/2403.16187) on plain ``lora`` adapters. Update rule: AB-LoRA importance of component i,
IS(i) = L(θ with component i masked) − L(θ), on the current batch; every ``every`` steps the k least important
components are pruned and k components are allocated to the most important modules, at a constant total rank.

- on an allocation step, ``on_step_begin`` puts a forward pre-hook on the model that keeps the step's batch
  (the last micro-batch) and a pass-through hook on a fused head, which turns the loop's fused head off for that
  step (the same loss and gradients, through the model's own forward, which the pre-hook sees); both are removed
  after the backward;
- after that step's optimizer step the model is re-run on the kept batch under ``torch.no_grad`` in eval mode
  (no dropout): once as is, then once per component with its B column zeroed (ablation: R + 1 forwards, R the
  total rank), giving IS(i); a module's importance is the mean IS of its components;
- the ``k`` components of least importance (never a module's last one, nor one allocated at the previous step,
  whose B column has barely left 0) are masked (B column := 0) and removed by rank surgery (outputs unchanged
  at removal); as many components are added, one each, to the most important modules among those that lost
  none (the paper's "modules whose ranks are not pruned"), then the others; a new component's B column is zero,
  so it starts at 0 contribution.

Allocation runs every ``every`` steps after ``t_init`` up to T − ``t_final``. The paper's gates αᵢ are the B
columns here (an ablation zeroes one), and its importance is measured on a validation batch where here it is the
training step's batch. The budget is the attached total rank (held constant, so it must equal it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._masking import check_move, check_window, due, move
from lorakit.train.loss import fused_head


@torch.no_grad()
def ablation_importance(
    model: nn.Module, layers: list[Layer], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Module -> (r,) IS(i) = loss with component i masked (its B column zeroed) − loss without, on one batch
    (``model(*args, **kwargs).loss``), in eval mode; the model's mode and weights are restored."""
    training = model.training
    model.eval()
    try:
        base = float(model(*args, **kwargs).loss)
        out = {}
        for name, _, a in layers:
            scores = torch.zeros(int(a.config.r))
            for i in range(scores.numel()):
                column = a.B[:, i].clone()  # (out,)
                a.B[:, i] = 0.0
                scores[i] = float(model(*args, **kwargs).loss) - base
                a.B[:, i] = column
            out[name] = scores
    finally:
        model.train(training)
    return out


@register_callback(
    "alora_alloc",
    help="ALoRA: 'lora' ranks moved from the components whose ablation raises the loss least to the most "
    "important modules, at a constant total rank. Options: budget (= attached total), k, every, t_init, t_final.",
)
class AloraAllocator(RankAllocator):
    name = "alora_alloc"

    def __init__(self, budget: int, k: int = 1, every: int = 10, t_init: int = 0, t_final: int = 0):
        """``budget``: total rank over all adapted modules (the attached one, held constant); ``k``: components
        moved at each allocation; ``every``: steps between allocations; ``t_init`` / ``t_final``: steps before /
        after the allocations."""
        super().__init__(budget)
        check_ints(self.name, k=k, every=every)
        check_ints(self.name, low=0, t_init=t_init, t_final=t_final)
        self.k, self.every, self.t_init, self.t_final = k, every, t_init, t_final
        self.batch: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.hooks: list[Any] = []
        self.fresh: dict[str, int] = {}  # module -> components allocated at the last step (its last ones)
        # (step, IS per component, pruned indices, modules grown) of every allocation
        self.history: list[tuple[int, dict[str, torch.Tensor], dict[str, list[int]], list[str]]] = []

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        check_move(self, layers, self.k)
        check_window(self, steps, self.t_init, self.t_final)

    def on_step_begin(self, state: TrainState) -> None:
        super().on_step_begin(state)
        if due(state.step + 1, self.steps, self.t_init, self.t_final, self.every):
            self.capture(state.model)

    def capture(self, model: nn.Module) -> None:
        """Keep the next forwards' batch (the last one wins) until :meth:`release`."""

        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.batch = (args, kwargs)

        self.hooks.append(model.register_forward_pre_hook(keep, with_kwargs=True))
        if (head := fused_head(model)) is not None:  # the fused loss would skip model.forward (and the hook)
            self.hooks.append(head.register_forward_hook(lambda module, args, output: None))

    def release(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def after_backward(self, state: TrainState) -> None:
        self.release()

    def after_optimizer_step(self, state: TrainState) -> None:
        if due(state.step, self.steps, self.t_init, self.t_final, self.every) and self.batch is not None:
            self.allocate(state.model, state.step, state.optimizer)
        self.batch = None

    def allocate(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """IS of every component on the kept batch; move the ``k`` least important; returns the modules grown."""
        assert self.batch is not None, "allocate needs a batch kept by capture()"
        layers = self.layers(model)
        scores = ablation_importance(model, layers, *self.batch)
        pruned, grown = move(self, layers, scores, self.k, optimizer, protected=self.fresh, unpruned_first=True)
        self.fresh = {name: grown.count(name) for name in grown}
        self.history.append((step, scores, pruned, grown))
        return grown

    def on_end(self, state: TrainState) -> None:
        self.release()
