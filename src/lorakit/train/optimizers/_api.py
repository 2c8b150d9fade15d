"""The optimizer contract and its registry.

An optimizer is one file in ``lorakit/train/optimizers/`` holding one builder decorated with
``@register_optimizer(name, help=..., paper=..., url=...)``: ``build(model, cfg) -> Optimizer`` gets
the adapted model and the :class:`~lorakit.train.loop.TrainConfig` (lr, weight_decay and the
optimizer's own fields) and returns a torch optimizer over the parameters to train. Importing
``lorakit.train.optimizers`` imports every such file, so adding one edits no other file;
``TrainConfig.optimizer``, ``lorakit train --optimizer`` and ``lorakit info`` read the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.inject import active_layers
from lorakit.methods._api import AdapterModule
from lorakit.registry import add_entry, get_entry

if TYPE_CHECKING:
    from lorakit.train.loop import TrainConfig

Builder = Callable[[nn.Module, "TrainConfig"], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """What the registry knows about one optimizer."""

    name: str
    build: Builder
    help: str  # one line, for --help and `lorakit info`
    paper: str
    url: str


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(name: str, *, help: str, paper: str, url: str) -> Callable[[Builder], Builder]:
    """Register ``build(model, cfg) -> torch.optim.Optimizer`` under ``name``."""

    def wrap(build: Builder) -> Builder:
        same = name in OPTIMIZERS and OPTIMIZERS[name].build is build
        add_entry(OPTIMIZERS, "optimizer", name, OptimizerSpec(name, build, help, paper, url), same)
        return build

    return wrap


def optimizer_names() -> str:
    """The registered names, for help texts: ``'adamw, lorafa, loraplus'``."""
    return ", ".join(sorted(OPTIMIZERS))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` over ``model``'s trainable parameters."""
    return get_entry(OPTIMIZERS, "optimizer", cfg.optimizer).build(model, cfg)


def active_adapters(model: nn.Module) -> Iterator[tuple[AdapterModule, nn.Module]]:
    """(active adapter, its base layer) for every wrapped layer."""
    for _, w, adapter in active_layers(model):
        yield adapter, w.base_layer
