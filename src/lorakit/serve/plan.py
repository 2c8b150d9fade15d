"""Route each token of a forward pass to its adapter: forward hooks on the served base layers.

The engine installs one forward hook per served layer (the model itself is not rewrapped, so
``lk.load_adapter`` can still convert other methods on it). Before a forward it sets a
:class:`ForwardPlan` — which slot (or compressed core) each flattened token uses — and every hook
adds that token's adapter delta to the layer's output with the batched ops of ``serve/ops``.
With no plan set, the hooks do nothing and the model is the plain base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.serve.ops import SlotBatch, add_compressed_delta_, add_lora_delta_
from lorakit.serve.slots import SlotBank


class CompressedSet:
    """One compressed collection as served: per module U (out, R), V (in, R), cores (C, R, R)."""

    def __init__(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], names: list[str]):
        self.modules, self.names = modules, names
        self.index = {n: i for i, n in enumerate(names)}
        self.rank = max((U.shape[1] for U, _, _ in modules.values()), default=0)  # the shared rank R


class ForwardPlan:
    """Token → adapter routing for one forward: ``slots`` (N,) into the bank, -1 = none; likewise per collection."""

    def __init__(self, bank: SlotBank, slots: torch.Tensor, cores: list[tuple[CompressedSet, torch.Tensor]]):
        self.bank = bank
        self.slots = slots  # (N,) long
        self.any_slot = bool((slots >= 0).any())
        self.cores = [(c, SlotBatch.for_cores(idx, len(c.names), c.rank)) for c, idx in cores if bool((idx >= 0).any())]
        self._batches: dict[tuple[int, ...], SlotBatch] = {}

    def _batch(self, ranks: list[int]) -> SlotBatch:
        key = tuple(ranks)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = SlotBatch.build(self.slots, ranks)
        return batch

    def apply(self, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add every token's adapter delta for ``module`` to ``y`` in place."""
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y2 = y.view(-1, y.shape[-1])  # (N, out)
        if self.any_slot and module in self.bank.A:
            add_lora_delta_(y2, x2, self.bank.A[module], self.bank.B[module], self._batch(self.bank.ranks[module]))
        for coll, batch in self.cores:
            parts = coll.modules.get(module)
            if parts is not None:
                U, V, cores = parts
                add_compressed_delta_(y2, x2, U, V, cores, batch)


class Router:
    """Holds the current plan and the hooks that apply it."""

    def __init__(self) -> None:
        self.plan: ForwardPlan | None = None
        self.handles: list[Any] = []

    def install(self, model: nn.Module, modules: list[str]) -> None:
        for name in modules:
            self.handles.append(model.get_submodule(name).register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            plan = self.plan
            if plan is not None:
                plan.apply(name, args[0], out)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
