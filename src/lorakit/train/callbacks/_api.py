"""The training-callback contract and its registry.

A callback is one file in ``lorakit/train/callbacks/`` holding one :class:`Callback` subclass decorated
with ``@register_callback(name, help=...)``; importing ``lorakit.train.callbacks`` imports every such
file, so adding one edits no other file. ``TrainConfig.callbacks`` (``lorakit train --callback NAME``)
names the ones a run uses, each as ``NAME`` or ``NAME:KEY=VALUE,...`` (keyword arguments of its class, values
parsed as YAML scalars); the loop builds each and calls every hook of every active
callback, in the configured order, at these points of each optimizer step::

    on_step_begin   before the step's first forward
    after_backward  every micro-batch's gradient is in .grad; before clipping and the optimizer step
    after_optimizer_step  after the optimizer and scheduler step, the gradients still in .grad (zeroed next):
                    where PEFT's AdaLoRA reads |p·∇p| of the updated weights (its documented loop order)
    on_step_end     after the optimizer and scheduler step (gradients already zeroed)
    on_save         after a checkpoint is written (``path``)
    on_end          once, after the last step

Rank allocators, schedules and layer samplers are callbacks: :class:`TrainState` hands them the
model, the optimizer and the scheduler the loop steps, which they may change in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from lorakit.errors import ConfigError
from lorakit.registry import add_entry, get_entry

if TYPE_CHECKING:
    from lorakit.train.loop import TrainConfig


@dataclass
class TrainState:
    """What every hook sees; the loop updates ``step`` and ``metrics`` as it goes."""

    model: nn.Module
    """The model being trained (accelerate's wrapper taken off)."""
    optimizer: torch.optim.Optimizer
    """The optimizer the loop steps (accelerate's wrapper around the registered optimizer's)."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The learning-rate scheduler the loop steps after the optimizer."""
    config: TrainConfig
    step: int = 0
    """Optimizer steps done: k in step k+1's on_step_begin and after_backward, k+1 from its
    after_optimizer_step."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The step's numbers where known: {} at its begin; loss, lr and tokens after backward;
    tokens_per_s too at its end."""


class Callback:
    """Hooks into the training loop; each defaults to doing nothing."""

    def on_step_begin(self, state: TrainState) -> None:
        """Before the step's first forward."""

    def after_backward(self, state: TrainState) -> None:
        """Gradients of the whole step exist (all micro-batches); clipping and the optimizer step follow."""

    def after_optimizer_step(self, state: TrainState) -> None:
        """After the optimizer and scheduler step, before the gradients are zeroed (``state.step`` is k+1)."""

    def on_step_end(self, state: TrainState) -> None:
        """After the optimizer and scheduler step."""

    def on_save(self, state: TrainState, path: Path) -> None:
        """After the loop wrote a checkpoint to ``path``."""

    def on_end(self, state: TrainState) -> None:
        """Once, after the last step."""


class CallbackList(Callback):
    """Several callbacks as one: each hook runs theirs, in order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def on_step_begin(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_step_begin(state)

    def after_backward(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.after_backward(state)

    def after_optimizer_step(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.after_optimizer_step(state)

    def on_step_end(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_step_end(state)

    def on_save(self, state: TrainState, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_save(state, path)

    def on_end(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_end(state)


@dataclass(frozen=True)
class CallbackSpec:
    """What the registry knows about one callback."""

    name: str
    cls: type[Callback]
    help: str  # one line, for --help and `lorakit info`


CALLBACKS: dict[str, CallbackSpec] = {}


def register_callback(name: str, *, help: str) -> Callable[[type[Callback]], type[Callback]]:
    """Class decorator that adds a :class:`Callback` subclass to :data:`CALLBACKS` under ``name``."""

    def wrap(cls: type[Callback]) -> type[Callback]:
        if not issubclass(cls, Callback):
            raise TypeError(f"callback {name!r}: {cls.__name__} must subclass lorakit.train.callbacks.Callback")
        same = name in CALLBACKS and CALLBACKS[name].cls is cls
        add_entry(CALLBACKS, "callback", name, CallbackSpec(name, cls, help), same)
        return cls

    return wrap


def callback_names() -> str:
    """The registered names, for help texts."""
    return ", ".join(sorted(CALLBACKS))


def parse_options(args: str, spec: str, kind: str, expected: str) -> dict[str, Any]:
    """``"budget=64,t_init=10"`` -> ``{"budget": 64, "t_init": 10}`` (values parsed as YAML scalars; ``-`` in a
    key reads as ``_``); a ConfigError naming ``kind``, ``spec`` and the ``expected`` form for a malformed pair.
    Shared by the callback and placement specs."""
    kwargs: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in args.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{kind} {spec!r}: expected {expected}, got {pair!r}.")
        kwargs[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return kwargs


def build_with_options(kind: str, name: str, cls: type[Any], kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``, or a ConfigError listing the options ``cls`` takes when ``kwargs`` do not fit them."""
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError:
        takes = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        shown = ", ".join(takes) or "none"
        raise ConfigError(f"{kind} {name!r} got {', '.join(kwargs) or 'no'} option(s); it takes: {shown}.") from None
    return cls(**kwargs)


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"adalora:budget=64,t_init=10"`` -> ``("adalora", {"budget": 64, "t_init": 10})``: a callback's name and
    its keyword arguments (:func:`parse_options`)."""
    name, _, args = spec.partition(":")
    return name.strip(), parse_options(args, spec, "callback", "NAME:KEY=VALUE,KEY=VALUE")


def _build(spec: str) -> Callback:
    name, kwargs = split_spec(spec)
    return build_with_options("callback", name, get_entry(CALLBACKS, "callback", name).cls, kwargs)


def check_callbacks(specs: tuple[str, ...]) -> None:
    """A clear ConfigError for the first spec whose name is not registered or whose options do not fit."""
    for spec in specs:
        _build(spec)


def build_callbacks(specs: tuple[str, ...]) -> CallbackList:
    """One instance of each callback spec (``name`` or ``name:key=value,...``), in order (a spec given twice
    runs once)."""
    return CallbackList([_build(spec) for spec in dict.fromkeys(specs)])
