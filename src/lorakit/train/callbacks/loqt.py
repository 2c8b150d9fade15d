"""loqt: LoQT's periodic merge (methods/lowrank/loqt.py) — after every ``merge_every``-th optimizer step, each active
LoQT adapter folds s·P·B into its base weight (a quantized base is quantized again), B restarts at 0 with its
optimizer state (AdamW's moments of the old B) dropped, and P becomes the top-r left singular vectors of that
step's gradient of the base weight, G = Σ_tokens gᵀx (g the gradient at the layer's output, x its input; summed
over the step's micro-batches), captured by hooks on the fold steps only.

A training callback rather than the adapter's ``set_step`` hook: the merge writes the base layer, which the
wrapper owns and ``set_step`` never sees; it resets optimizer state, which only :class:`TrainState` holds; and
the new P needs the step's gradient, which hooks around the whole step collect.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.inject import AdaptedLayer, active_layers
from lorakit.methods.lowrank.loqt import Loqt
from lorakit.train.callbacks._api import Callback, TrainState, register_callback


def _active_loqt(model: nn.Module) -> list[tuple[str, AdaptedLayer, Loqt]]:
    """(module name, wrapper, adapter) of every layer whose active adapter is a LoQT one."""
    found: list[tuple[str, AdaptedLayer, Loqt]] = []
    for name, w, adapter in active_layers(model):
        if isinstance(adapter, Loqt):
            found.append((name, w, adapter))
    return found


@register_callback(
    "loqt", help="LoQT: every merge_every steps fold each loqt adapter's P·B into its base, restart B, new P."
)
class LoqtMerge(Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}  # module -> (out, in) gradient of its base weight on a fold step
        self.hooks: list[Any] = []

    def on_step_begin(self, state: TrainState) -> None:
        for name, wrapper, adapter in _active_loqt(state.model):
            if (state.step + 1) % adapter.config.merge_every == 0:  # this step ends in a fold: collect G
                self.hooks.append(wrapper.register_forward_hook(self._capture(name)))

    def _capture(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if out.requires_grad:
                x = inputs[0].detach()

                def grad(g: torch.Tensor) -> None:  # ∇_W += gᵀx over the tokens, (out, in)
                    G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                    self.grads[name] = self.grads[name] + G if name in self.grads else G

                out.register_hook(grad)

        return hook

    def on_step_end(self, state: TrainState) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for name, wrapper, adapter in _active_loqt(state.model):
            if state.step % adapter.config.merge_every == 0:
                adapter.fold(wrapper.base_layer)
                state.optimizer.state.pop(adapter.B, None)  # fresh moments for the restarted B
                if name in self.grads:
                    adapter.set_projection(self.grads[name])
        self.grads.clear()
