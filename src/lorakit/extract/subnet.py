"""One configuration of an ``ofa_quant`` supernet as a deployable model: a real quantized base plus a plain LoRA.

Semantics: for every ofa_quant layer at bit-width b, the layer becomes ``get_quant(f"int{b}g")`` of its
full-precision weight (packed codes, ``IntGroupLinear``; the same Ŵ the supernet simulates, bit for bit) and
carries an ordinary ``lora`` adapter holding (A_b, B_b) with the same r and alpha. Its logits equal the
supernet's at that configuration exactly (the forward runs the same operations in the same order).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.inject import AdaptedLayer, attach, delete_adapter, wrappers
from lorakit.io import save_adapter
from lorakit.methods import method_config
from lorakit.methods.lowrank.ofa_quant import OfaQuant, ofa_layers
from lorakit.quant import get_quant
from lorakit.quant._api import dense_linear

KINDS = {(2, 32): "int2g", (3, 32): "int3g", (4, 32): "int4g", (4, 128): "int4g128"}  # (bits, group) -> kind


def extract_subnet(
    model: nn.Module,
    config: int | Mapping[str, int] | None = None,
    path: str | Path | None = None,
    name: str = "default",
) -> nn.Module:
    """A new model: ``model``'s ofa_quant layers quantized at ``config`` (one bit-width for all, {module: bits},
    or None: each layer's active one) with adapter ``name``, a plain ``lora`` of the chosen bit-widths' (A_b, B_b),
    attached and active; saved to ``path`` as an ordinary adapter dir when given. ``model`` is not changed."""
    layers = ofa_layers(model)
    if not layers:
        raise ConfigError("extract_subnet() found no active ofa_quant adapter in the model.")
    chosen = _configuration(layers, config)
    first = next(iter(layers.values())).config
    if any(a.config.r != first.r or a.config.alpha != first.alpha for a in layers.values()):
        raise ConfigError("extract_subnet() needs one r and alpha across the supernet (rank/alpha patterns differ).")
    sub = copy.deepcopy(model)
    for ofa_name in {w.active for n, w in wrappers(model) if n in layers}:
        delete_adapter(sub, ofa_name)  # type: ignore[arg-type]
    for n in layers:
        held = sub.get_submodule(n)
        base = held.base_layer if isinstance(held, AdaptedLayer) else held  # another adapter may wrap it too
        dense = dense_linear(L.weight_out_in(base), L.base_bias(base))
        quantized = get_quant(KINDS[(chosen[n], layers[n].config.group_size)]).fn(dense).train(base.training)
        if isinstance(held, AdaptedLayer):
            held.base_layer = quantized
        else:
            parent, _, child = n.rpartition(".")
            setattr(sub.get_submodule(parent) if parent else sub, child, quantized)
    attach(sub, method_config("lora", r=first.r, alpha=first.alpha), targets=list(layers), name=name)
    new = dict(wrappers(sub))
    with torch.no_grad():
        for n, adapter in layers.items():
            A, B = adapter.factors(chosen[n])
            lora = new[n].adapters[name]
            lora.A.copy_(A)  # type: ignore[operator]
            lora.B.copy_(B)  # type: ignore[operator]
    if path is not None:
        save_adapter(sub, path, name)
    return sub


def _configuration(layers: Mapping[str, OfaQuant], config: int | Mapping[str, int] | None) -> dict[str, int]:
    """{module: bits} of ``config`` over ``layers`` (unnamed modules keep their active bits), checked."""
    chosen = {n: a.active_bits for n, a in layers.items()}
    chosen |= {n: config for n in layers} if isinstance(config, int) else dict(config or {})
    for n, b in chosen.items():
        if n not in layers or b not in layers[n].config.bits:
            raise ConfigError(f"extract_subnet(): {n} at {b} bits is not a configuration of this supernet.")
        if (b, layers[n].config.group_size) not in KINDS:
            raise ConfigError(
                f"extract_subnet(): no registered quantization kind quantizes {b} bits in groups of "
                f"{layers[n].config.group_size}; the int kinds are {sorted(KINDS.values())}."
            )
    return chosen
