"""The base-layer kind contract and its registry.

A kind says how adapters see one type of wrapped layer as a linear map from ``in`` to ``out``: its
dimensions, its dense weight in (out, in) orientation, how a delta goes back into its own weight
layout, and how a projection A (r, in) applies to its input. Methods call only these, so a new kind
(a quantized Linear, a Conv2d) is one file here and no method changes.
"""

from __future__ import annotations

import sys
from functools import reduce
from typing import Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.registry import add_entry


class LayerKind(Protocol):
    """How adapters read one type of base layer (all tensors in the layer's device and dtype)."""

    name: ClassVar[str]
    """The kind's own name: 'linear', 'conv1d', 'embedding', ... (one per registered kind)."""
    family: ClassVar[str]
    """The layer kind methods list in ``@register(layers=...)``: a quantized or re-laid-out Linear is in the
    'linear' family, so every method that wraps Linear layers wraps it too, through this kind's readers."""
    types: ClassVar[tuple[type[nn.Module] | str, ...]]
    """The module classes of this kind (subclasses match too); a class of an optional backend is named as
    ``"module:QualName"`` (e.g. ``"bitsandbytes.nn.modules:Linear4bit"``), so registering the kind imports
    nothing: it matches once that module is imported (no instance of its classes can exist before)."""
    quantized: ClassVar[bool]
    """The weight is stored quantized: ``weight_out_in`` dequantizes it (a new tensor), and nothing can be
    written into it (merging or an init that rewrites the base needs the full-precision model)."""

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the layer seen as a linear map."""
        ...

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        """The dense weight as an (out, in) matrix (a view where the layout allows)."""
        ...

    @staticmethod
    def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """An (out, in) delta in the layer's own weight layout, so that merged weight = weight + delta."""
        ...

    @staticmethod
    def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """x ↦ A·x for A (r, in), shape (..., r), on the layer's input x."""
        ...

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """W·x without the bias."""
        ...

    @staticmethod
    def base_bias(base: nn.Module) -> torch.Tensor | None:
        """The output bias the layer adds, or None."""
        ...

    @staticmethod
    def forward_with(base: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The layer's output with the (out, in) matrix W in place of its weight (its bias and settings kept), in
        the ops of the layer's own forward where the kind is dense, so a layer holding W gives the same bits
        (a method that replaces the weight outright: EfficientDM's fake-quantized W + s·B·A)."""
        ...

    @staticmethod
    def requantize(base: nn.Module, W: torch.Tensor) -> None:
        """Quantized kinds only: store the (out, in) matrix W in the layer, in place, quantized again with the
        layer's own quantizer (its type, block size and dtype), as quantizing a fresh Linear holding W would. Dense
        kinds need not define it: ``layers.store`` writes their weight directly."""
        ...

    # Optional, quantized kinds: ``forward_dtype(base, x_dtype) -> torch.dtype``, the dtype d in which the
    # layer's forward on an x_dtype input is exactly F.linear(x.to(d), weight_out_in(base).to(d), bias). A kind
    # that declares it lets fused training nodes dequantize the weight themselves (layers.dequantized_forward).


def linear_forward_with(base: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``forward_with`` of every kind in the linear map's own orientation (Linear, GPT-2's Conv1D, the quantized
    Linears): x·Wᵀ + b by ``F.linear``, nn.Linear's own forward (the casts are no-ops on a float base)."""
    bias: torch.Tensor | None = base.bias  # type: ignore[assignment]
    return F.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))


KINDS: dict[str, type[LayerKind]] = {}
_BY_TYPE: dict[type, type[LayerKind] | None] = {}  # cache: module class -> its kind (None: unsupported)
K = TypeVar("K", bound=type)


def register_kind(cls: K) -> K:
    """Class decorator that adds a base-layer kind to :data:`KINDS` under ``cls.name``."""
    kind: Any = cls  # a class with the protocol's static methods
    add_entry(KINDS, "layer kind", kind.name, kind, same=KINDS.get(kind.name) is kind)
    _BY_TYPE.clear()
    return cls


def types_of(kind: type[LayerKind]) -> tuple[type[nn.Module], ...]:
    """The classes of ``kind`` that exist now: its classes, and those it names whose module is imported."""
    found: list[Any] = []
    for t in kind.types:
        if isinstance(t, str):
            module, _, qualname = t.partition(":")
            if module in sys.modules:
                found.append(reduce(getattr, qualname.split("."), sys.modules[module]))
        else:
            found.append(t)
    return tuple(found)


def kind_of(base: nn.Module) -> type[LayerKind] | None:
    """The registered kind of ``base`` (exact class first, then the first kind it subclasses), or None."""
    t = type(base)
    try:
        return _BY_TYPE[t]
    except KeyError:
        exact = [k for k in KINDS.values() if t in types_of(k)]
        found = exact[0] if exact else next((k for k in KINDS.values() if issubclass(t, types_of(k))), None)
        _BY_TYPE[t] = found  # a named class's module is imported before any instance exists, so this stays right
        return found
