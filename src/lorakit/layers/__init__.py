"""Base-layer kinds: how adapters read a wrapped layer, one file per kind, registered by decorator.

Every kind is seen through one lens, a linear map from ``in`` to ``out``: ``nn.Linear`` stores W as
(out, in); transformers' GPT-2 ``Conv1D`` stores (in, out); ``nn.Embedding`` stores (num_embeddings,
dim) and is linear in the one-hot token; ``nn.Conv2d`` (groups=1) is W (out, in·kh·kw) on each input patch,
its own family "conv2d" (outputs channels first). Methods work in (out, in) orientation and call the
functions below, which dispatch on the layer's kind; importing this package registers every kind.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.errors import TargetError
from lorakit.layers._api import KINDS, LayerKind, kind_of, register_kind, types_of
from lorakit.lowrank import LoraFactors
from lorakit.registry import import_entries

import_entries(__name__, __path__)


def supported_types() -> tuple[type[nn.Module], ...]:
    """The module classes some registered kind reads."""
    return tuple(t for k in KINDS.values() for t in types_of(k))


def _kind(base: nn.Module, name: str = "") -> type[LayerKind]:
    kind = kind_of(base)
    if kind is None:
        where = f"module {name!r}" if name else "a target module"
        supported = ", ".join(f"{t.__module__}.{t.__name__}" for t in supported_types())
        raise TargetError(
            f"{where} is a {type(base).__module__}.{type(base).__name__}, which lorakit adapters cannot wrap; "
            f"supported types are {supported}. Narrow `targets` or add the module to `exclude`."
        )
    return kind


def layer_kind(base: nn.Module, name: str = "") -> str:
    """The layer's family ('linear', 'conv1d', 'embedding', 'conv2d'), which methods declare they wrap; an unsupported
    type is a TargetError naming it."""
    return _kind(base, name).family


def dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the base layer seen as a linear map."""
    return _kind(base).dims(base)


def weight_out_in(base: nn.Module) -> torch.Tensor:
    """The base weight as an (out, in) matrix (a view, no copy, for the dense kinds)."""
    return _kind(base).weight_out_in(base)


def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Turn an (out, in) delta into the base weight's own layout."""
    return _kind(base).to_base_layout(base, delta)


def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """x ↦ A·x for A (r, in): a matmul for linear maps, a row lookup of Aᵀ for embeddings."""
    return _kind(base).project_in(base, x, A)


def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W·x without the bias (DoRA rescales only the weight's contribution)."""
    return _kind(base).base_linear(base, x)


def forward_with(base: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The layer's output with the (out, in) matrix W in place of its weight, bias and settings its own."""
    return _kind(base).forward_with(base, x, W)


def base_bias(base: nn.Module) -> torch.Tensor | None:
    return _kind(base).base_bias(base)


def is_quantized(base: nn.Module) -> bool:
    """Whether the layer is of a registered kind that stores its weight quantized (nothing can be written into it)."""
    kind = kind_of(base)
    return kind is not None and kind.quantized


def dequantized_forward(base: nn.Module, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
    """For a quantized layer whose forward on an input of ``dtype`` is exactly ``F.linear(x, Ŵ, bias)`` with
    Ŵ = ``weight_out_in(base)`` in that dtype (the kind declares it through ``forward_dtype``): a function
    building Ŵ, so a fused training node can rebuild it in its backward pass instead of keeping it. Else None."""
    kind = kind_of(base)
    forward_dtype = getattr(kind, "forward_dtype", None)
    if kind is None or not kind.quantized or forward_dtype is None or forward_dtype(base, dtype) != dtype:
        return None
    return lambda: kind.weight_out_in(base).to(dtype)


def require_dense(base: nn.Module, what: str) -> None:
    """A TargetError when ``base`` is quantized: ``what`` (merging, an init that rewrites the base) needs W itself."""
    if is_quantized(base):
        raise TargetError(
            f"{what} writes into the base weight, but this {_kind(base).name} layer holds it quantized. Do it on the "
            "full-precision model and quantize after (lk.quantize(model, kind)), or lk.dequantize(model) first."
        )


def subtract(base: nn.Module, shift: LoraFactors) -> None:
    """base.weight ← W − scale·B @ A (a residual base), computed in float32, stored in the weight's dtype and layout."""
    require_dense(base, "an init that moves s·B·A out of the base")
    weight: torch.Tensor = base.weight  # type: ignore[assignment]
    with torch.no_grad():
        delta = shift.scale * (shift.B.float() @ shift.A.float())  # (out, in)
        weight.copy_((weight.float() - to_base_layout(base, delta)).to(weight.dtype))


def store(base: nn.Module, W: torch.Tensor) -> None:
    """base's weight ← W (an (out, in) matrix) in the layer's own storage: written in its dtype and layout, or, for a
    quantized kind, quantized again with the layer's own quantizer (LoQT's periodic merge into a quantized W)."""
    kind = _kind(base)
    if kind.quantized:
        kind.requantize(base, W.detach())
        return
    weight: torch.Tensor = base.weight  # type: ignore[assignment]
    with torch.no_grad():
        weight.copy_(to_base_layout(base, W.to(weight.device)).to(weight.dtype))


def assign(base: nn.Module, W: torch.Tensor) -> None:
    """base.weight ← W (an (out, in) matrix), stored in the weight's dtype and layout (LoftQ's new base Q)."""
    require_dense(base, "an init that replaces the base weight")
    weight: torch.Tensor = base.weight  # type: ignore[assignment]
    with torch.no_grad():
        weight.copy_(to_base_layout(base, W.to(weight.device)).to(weight.dtype))


__all__ = ["KINDS", "LayerKind", "base_bias", "base_linear", "dims", "is_quantized", "kind_of", "layer_kind"]
__all__ += ["project_in", "register_kind", "require_dense", "subtract", "supported_types", "to_base_layout"]
__all__ += ["assign", "forward_with", "store", "types_of", "weight_out_in"]
