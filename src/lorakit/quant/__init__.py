"""Quantized bases: ``lk.quantize(model, "nf4")`` replaces a model's Linear layers by quantized ones, in place.

One file per quantization kind (``@register_quant`` in ``_api.py``): ``nf4``, ``fp4`` and ``int8`` through
bitsandbytes (imported on first use; ``pip install 'lorakit[quant]'``); ``int4g`` (and ``int4g128``, ``int3g``,
``int2g``) in pure torch: GPTQ-style integer codes with a scale and a float zero point per group of inputs
(``intgroup.py``). ``_reference.py`` is a pure-torch blockwise quantizer (NF4, whose bytes and scales equal
bitsandbytes', and the 2/3-bit normal grids LoftQ uses). ``rilq.py`` is a procedure, not a kind: RILQ trains the
adapters on a 2-bit base jointly against the full-precision model (``lorakit.quant.rilq``). Adapters read a
quantized layer through its base-layer kind in ``lorakit/layers``, so every method that wraps Linear layers trains
on a quantized base (QLoRA) without knowing the backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Sequence

from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError, TargetError
from lorakit.layers._wrapper import WRAPPERS
from lorakit.quant._api import QUANTS, QuantSpec, dense_linear, get_quant, register_quant
from lorakit.quant._merge import MergeDrift
from lorakit.quant.rilq import RilqResult, rilq  # the function; ``from lorakit.quant.rilq import ...`` still works
from lorakit.registry import import_entries

import_entries(__name__, __path__)

FLAGS = {4: "is_loaded_in_4bit", 8: "is_loaded_in_8bit"}  # what transformers and PEFT read on a bitsandbytes model


def _check_plain(model: nn.Module, what: str) -> None:
    if any(isinstance(m, WRAPPERS) for m in model.modules()):
        raise ConfigError(
            f"{what} needs a model without adapters; it has some attached. {what.capitalize()} the base first, "
            "then attach (or lk.merge / lk.delete_adapter the adapters)."
        )


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize(model: nn.Module, kind: str = "nf4", *, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (but those whose name ends in one of ``skip``: the output
    head by default) by the quantized layer of ``kind`` ('nf4', 'fp4', 'int8', 'int4g', ...), in place; returns
    ``model``.

    Quantize before attaching adapters. A bitsandbytes kind marks the model as transformers marks a bitsandbytes
    model (``is_loaded_in_4bit`` / ``is_loaded_in_8bit``), so PEFT wraps its layers with its own bitsandbytes LoRA.
    """
    if isinstance(skip, str):
        raise ConfigError(f"skip must be a list of module-name suffixes, got the string {skip!r}; use [{skip!r}].")
    spec: QuantSpec = get_quant(kind)
    _check_plain(model, "quantize")
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]
    if not chosen:
        raise TargetError(
            f"quantize({kind!r}) found no nn.Linear layer in {type(model).__name__} outside skip={list(skip)!r}; "
            "only torch.nn.Linear layers are quantized (not GPT-2's Conv1D or already-quantized layers)."
        )
    new = {name: spec.fn(layer) for name, layer in chosen}  # all built before any is placed
    for name, layer in new.items():
        layer.train(model.training)
        _replace(model, name, layer)
    if spec.backend == "bitsandbytes" and spec.bits in FLAGS:
        setattr(model, FLAGS[spec.bits], True)
    del chosen, new
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Give the pages of freed tensors back to the OS (glibc). Its heap keeps freed blocks of a replaced model's
    weight size (glibc raises its mmap threshold as large blocks are freed), so without this the float weights
    quantizing freed still count in RSS, and later tensors fill them unevenly (measured: +410 MB RSS on
    SmolLM2's shape)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized layer of ``model`` by an ``nn.Linear`` holding its dequantized weight (float32,
    bias kept), in place; returns ``model``. The result is a plain full-precision model (merging works on it)."""
    _check_plain(model, "dequantize")
    for name, layer in [(n, m) for n, m in model.named_modules() if L.is_quantized(m)]:
        plain = dense_linear(L.weight_out_in(layer), L.base_bias(layer))
        plain.train(layer.training)
        _replace(model, name, plain)
    for flag in FLAGS.values():
        model.__dict__.pop(flag, None)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_kinds(model: nn.Module) -> set[str]:
    """Names of the base-layer kinds of the quantized layers in ``model`` (empty: none is quantized)."""
    return {kind.name for m in model.modules() if (kind := L.kind_of(m)) is not None and kind.quantized}


def merge_drift(merged: nn.Module) -> MergeDrift | None:
    """The drift report ``lk.merge`` left on a model merged onto a quantized base, or None."""
    return merged.__dict__.get("lorakit_merge_drift")


__all__ = ["QUANTS", "MergeDrift", "QuantSpec", "dequantize", "get_quant", "merge_drift", "quantize"]
__all__ += ["RilqResult", "quantized_kinds", "register_quant", "rilq"]
