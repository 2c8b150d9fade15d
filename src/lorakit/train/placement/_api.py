"""The placement contract and its registry: methods that pick an adapter's ``targets`` before training.

A placement is one file in ``lorakit/train/placement/`` holding one :class:`Placement` subclass decorated with
``@register_placement(name, help=...)``; importing ``lorakit.train.placement`` imports every such file, so adding
one edits no other file. Its options are the keyword arguments of its class (checked in ``__init__``, so a bad
value fails before any model loads); its :meth:`Placement.choose` reads the base model on a few training batches
and returns a ``targets`` list ``lk.attach`` accepts (module-type suffixes such as ``["q_proj", "v_proj"]``, or
full module names).

Spec syntax (``lorakit train --targets``, ``RunSpec.targets``, :func:`place`)::

    auto:NAME                     e.g. auto:plop
    auto:NAME:KEY=VALUE,...       e.g. auto:plop:k=3   auto:diffora:k=6,steps=30,per=type

Values are YAML scalars; a ``-`` in a key reads as ``_``. The ``auto:`` prefix is optional in :func:`place`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import find_targets
from lorakit.registry import add_entry, get_entry
from lorakit.train.callbacks._api import build_with_options, parse_options

PREFIX = "auto:"
Batch = dict[str, torch.Tensor]


class Placement(abc.ABC):
    """Picks targets from the base model and a few batches; options are the subclass's ``__init__`` arguments."""

    name = "placement"

    @abc.abstractmethod
    def choose(
        self, model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, exclude: Sequence[str] | None = None
    ) -> list[str]:
        """The targets for ``lk.attach`` (never empty), the same for the same model, batches and ``seed``;
        ``model`` is left as it was (weights, modes, grads). ``exclude``: modules never to target (a head)."""


@dataclass(frozen=True)
class PlacementSpec:
    """What the registry knows about one placement."""

    name: str
    cls: type[Placement]
    help: str  # one line, for help texts


PLACEMENTS: dict[str, PlacementSpec] = {}


def register_placement(name: str, *, help: str) -> Callable[[type[Placement]], type[Placement]]:
    """Class decorator that adds a :class:`Placement` subclass to :data:`PLACEMENTS` under ``name``."""

    def wrap(cls: type[Placement]) -> type[Placement]:
        if not issubclass(cls, Placement):
            raise TypeError(f"placement {name!r}: {cls.__name__} must subclass lorakit.train.placement.Placement")
        same = name in PLACEMENTS and PLACEMENTS[name].cls is cls
        add_entry(PLACEMENTS, "placement", name, PlacementSpec(name, cls, help), same)
        return cls

    return wrap


def placement_names() -> str:
    """The registered names as ``auto:NAME`` specs, for help texts."""
    return ", ".join(PREFIX + n for n in sorted(PLACEMENTS))


def is_placement(targets: object) -> bool:
    """Whether ``targets`` is a placement spec (a string starting ``auto:``) rather than targets proper."""
    return isinstance(targets, str) and targets.strip().startswith(PREFIX)


def split_placement(spec: str) -> tuple[str, dict[str, Any]]:
    """``"auto:diffora:k=4,steps=10"`` -> ``("diffora", {"k": 4, "steps": 10})``."""
    body = spec.strip()
    body = body[len(PREFIX) :] if body.startswith(PREFIX) else body
    name, _, args = body.partition(":")
    kwargs = parse_options(args, spec, "placement", "auto:NAME:KEY=VALUE,KEY=VALUE")
    if not name.strip():
        raise ConfigError(f"placement {spec!r} names no method; registered: {placement_names()}.")
    return name.strip(), kwargs


def build_placement(spec: str) -> Placement:
    """The placement ``spec`` names, built with its options: a ConfigError for an unknown name or bad options."""
    name, kwargs = split_placement(spec)
    placement: Placement = build_with_options("placement", name, get_entry(PLACEMENTS, "placement", name).cls, kwargs)
    return placement


def check_placement(spec: str) -> None:
    """A clear ConfigError when ``spec`` names no registered placement or its options do not fit."""
    build_placement(spec)


def candidates(model: nn.Module, exclude: Sequence[str] | None = None) -> list[str]:
    """The modules a placement chooses among: what ``targets="all-linear"`` selects (every Linear/Conv1D but
    the output head), less ``exclude``."""
    return find_targets(model, "all-linear", list(exclude) if exclude else None)


def module_type(name: str) -> str:
    """A module name's type suffix: ``model.layers.0.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def forward_batch(model: nn.Module, batch: Batch) -> Any:
    """``model(**batch)`` with the batch moved to the model's device."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()})


def place(
    model: nn.Module,
    batches: Sequence[Batch],
    spec: str,
    *,
    seed: int = 0,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Targets chosen by the placement ``spec`` (``auto:NAME[:KEY=VALUE,...]``) on ``model`` and ``batches``
    (dicts with input_ids, attention_mask, labels, as ``lorakit.train.data.collate`` makes): a list usable as
    ``lk.attach(model, cfg, targets=...)``, the same for the same inputs and ``seed``; ``model`` is unchanged."""
    placement = build_placement(spec)
    if not batches:
        raise ConfigError(f"placement {spec!r} needs at least one batch of training data.")
    chosen = placement.choose(model, list(batches), seed=seed, exclude=exclude)
    find_targets(model, chosen, list(exclude) if exclude else None)  # usable as targets: TargetError otherwise
    return chosen
