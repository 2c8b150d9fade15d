"""The quantization-kind contract and its registry: how one nn.Linear becomes a quantized layer.

A kind is one file in ``lorakit/quant/`` holding a function decorated with ``@register_quant(...)``
that takes a full-precision ``nn.Linear`` and returns the quantized module standing in for it (its
forward computes x·Ŵᵀ + b with Ŵ the dequantized weight). How adapters then read that module is its
base-layer kind in ``lorakit/layers/`` (family "linear"), so methods never import a backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.registry import add_entry, get_entry

Quantizer = Callable[[nn.Linear], nn.Module]
Absorber = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], "nn.Module | None"]


@dataclass(frozen=True)
class QuantSpec:
    """What the registry knows about one quantization kind."""

    name: str
    fn: Quantizer  # nn.Linear -> quantized module (same in/out features, bias kept)
    bits: int  # bits per weight (before the per-block scales)
    backend: str  # "bitsandbytes" or "torch"
    description: str
    absorb: Absorber | None = None
    """Optional: (layer, ΔW (out, in), Δbias or None) -> a layer of this kind holding Ŵ + ΔW exactly with its codes
    unchanged, or None when ΔW is not of a form the kind's stored parameters can take (then ``lk.merge``
    re-quantizes Ŵ + ΔW). The integer group kinds absorb a ΔW constant over each group into their zero points."""


QUANTS: dict[str, QuantSpec] = {}


def register_quant(
    name: str, *, bits: int, backend: str, description: str, absorb: Absorber | None = None
) -> Callable[[Quantizer], Quantizer]:
    """Function decorator that adds a quantization kind to :data:`QUANTS` under ``name`` (``absorb``: see QuantSpec)."""

    def wrap(fn: Quantizer) -> Quantizer:
        spec = QuantSpec(name, fn, bits, backend, description, absorb)
        add_entry(QUANTS, "quantization kind", name, spec, same=name in QUANTS and QUANTS[name].fn is fn)
        return fn

    return wrap


def get_quant(name: str) -> QuantSpec:
    """The spec of kind ``name``; an unknown name is a ConfigError with the closest registered names."""
    return get_entry(QUANTS, "quantization kind", name)


def bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, imported on first use; a clear ConfigError when it is not installed."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as e:
        raise ConfigError(
            f"quantizing with bitsandbytes needs the bitsandbytes package ({e}); install it with "
            "`pip install 'lorakit[quant]'` (bitsandbytes>=0.50 ships a CPU library)."
        ) from e


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen float32 ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` (dequantizing and merging build one)."""
    d_out, d_in = weight.shape
    layer = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return layer
