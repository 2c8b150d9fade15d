"""The method contract and the registry.

A method is one file in ``lorakit/methods/`` that decorates its adapter class with
``@register(...)``. Importing ``lorakit.methods`` imports every such file, so adding a method
edits no other file. The adapter class satisfies :class:`Adapter`; its frozen, keyword-only
config dataclass is validated in ``__post_init__``.

An adapter class may also define the optional initialisation hook
``initialize(cls, model, adapters, cfg, batches) -> None`` (a classmethod): ``attach`` calls it
once, after every new adapter is in place and active, with ``adapters`` = {logical module name:
adapter} and ``batches`` = the calibration batches (a list of dicts of tensors) or None.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from lorakit.errors import ConfigError

ALL_LAYERS = ("linear", "conv1d", "embedding")


class LoraFactors(NamedTuple):
    """Plain low-rank form of an update: ΔW = scale · B @ A in (out, in) orientation."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float


class Adapter(Protocol):
    """One adapter of one method on one base layer (the container owns the base layer).

    ``forward`` receives the layer input ``x``, the base layer and the base output ``y`` and
    returns the adapted output. Keys of ``export_state`` are PEFT's per-module suffixes
    (``lora_A.weight``, ``lora_magnitude_vector``, ...), so the on-disk format needs no table.
    """

    config: Any
    peft_type: ClassVar[str | None]

    @classmethod
    def from_base(cls, base: nn.Module, cfg: Any) -> Adapter: ...

    def forward(self, x: torch.Tensor, base: nn.Module, y: torch.Tensor) -> torch.Tensor: ...

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """ΔW in the base layer's own weight layout, so that merged weight = W + ΔW."""
        ...

    def to_lora(self, base: nn.Module, rank: int | None = None) -> LoraFactors: ...

    def export_state(self) -> dict[str, torch.Tensor]: ...

    def import_state(self, state: dict[str, torch.Tensor]) -> None: ...

    @staticmethod
    def peft_fields(cfg: Any) -> dict[str, Any]:
        """Method-specific fields of ``adapter_config.json``."""
        ...

    @staticmethod
    def config_from_peft(fields: dict[str, Any]) -> Any | None:
        """This method's config if ``fields`` (an adapter_config.json) describes it, else None."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method."""

    name: str
    adapter: Any  # the adapter class: an nn.Module satisfying the Adapter protocol
    config: type
    paper: str
    url: str
    identity_at_init: bool  # the paper's init leaves the model's outputs unchanged
    mergeable: bool  # delta_weight() is exact, so merge == unmerged forward
    family: str  # PAPERS.md family, e.g. "F1" (core LoRA & scaling)
    params: str  # trainable parameters per wrapped layer, in d_in, d_out and config fields
    layers: tuple[str, ...] = ALL_LAYERS  # layer kinds the method wraps (see methods/_layers.py)
    needs_calibration: bool = False  # its initialisation reads data: attach(..., calibration=batches)

    def param_count(self, d_in: int, d_out: int, cfg: Any) -> int:
        """Evaluate :attr:`params` (a fixed arithmetic expression written by the method's author)."""
        names = {"d_in": d_in, "d_out": d_out, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}
        return int(eval(self.params, {"__builtins__": {}}, names))  # noqa: S307 - author-written formula


REGISTRY: dict[str, MethodSpec] = {}


def register(
    name: str,
    *,
    config: type,
    paper: str,
    url: str,
    family: str,
    params: str,
    identity_at_init: bool = True,
    mergeable: bool = True,
    layers: tuple[str, ...] = ALL_LAYERS,
    calibration: bool = False,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that adds an adapter class to :data:`REGISTRY` under ``name``.

    ``params`` is the paper's trainable-parameter count per wrapped layer as an arithmetic
    expression in ``d_in``, ``d_out`` and the config's fields, e.g. ``"r*(d_in+d_out)"``; the
    conformance suite checks it against the real count and the README shows it. ``layers``
    lists the layer kinds the method can wrap; targeting another kind is a clear TargetError.
    ``calibration=True`` marks an initialisation that reads data: ``attach`` then requires
    ``calibration=batches`` and hands them to the adapter class's ``initialize`` hook.
    """

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in REGISTRY and REGISTRY[name].adapter is not cls:
            raise ValueError(f"method {name!r} is registered twice ({REGISTRY[name].adapter} and {cls})")
        if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):  # type: ignore[attr-defined]
            raise TypeError(f"method {name!r}: its config {config.__name__} must be a frozen dataclass")
        cls.method_name = name  # type: ignore[attr-defined]
        REGISTRY[name] = MethodSpec(
            name, cls, config, paper, url, identity_at_init, mergeable, family, params, tuple(layers), calibration
        )
        return cls

    return wrap


def get_spec(name: str) -> MethodSpec:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]


def method_config(name: str, **opts: Any) -> Any:
    """Build the config of method ``name``; unknown options get an error listing the valid ones."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise ConfigError(
            f"method {name!r} has no option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(fields))}."
        )
    return spec.config(**opts)


def spec_of_config(cfg: Any) -> MethodSpec:
    """The registered method whose config class is ``type(cfg)``."""
    for spec in REGISTRY.values():
        if type(cfg) is spec.config:
            return spec
    raise ConfigError(
        f"{type(cfg).__name__} is not the config of any registered method; use lk.method_config(name, ...)."
    )


def require(ok: bool, message: str) -> None:
    """Config validation helper: raise a ConfigError with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)
