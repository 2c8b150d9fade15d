"""Save an adapter whose init left a residual base (W_res = W − s₀·B₀·A₀) as a delta for the ORIGINAL W.

The live model computes W_res + s·B·A inside the layer. On the original W the same layer needs the
pair [A; A₀] (r + r₀, in) and [s·B, −s₀·B₀] / s' (out, r + r₀), with s' the method's scale at rank
r + r₀: the method's own format at a higher rank, every other tensor (DoRA's magnitude, ...) as it
is. So a PiSSA-initialised DoRA saves as a plain DoRA of rank 2r that PEFT and lorakit load onto the
original base (PEFT's path_initial_model_for_weight_conversion does the same for LoRA).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lorakit import layers as L
from lorakit.layers._wrapper import AdaptedLayer
from lorakit.methods._api import AdapterModule


def foldable(adapters: dict[str, AdapterModule]) -> bool:
    """Every shift came from an init option (``init_shift``, on a method with a trained pair); a method's own
    base-rewriting init (LoLDU, SaLoRA, DoTA) saves as a plain LoRA instead."""
    return all(a.base_shift() is None or (a.init_shift is not None and a.init_factors()) for a in adapters.values())


def folded(
    model: nn.Module, adapters: dict[str, AdapterModule]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, float]]:
    """({module: export_state at rank r + r₀}, {module: its config}, the original bases' weight norms)."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, Any] = {}
    prints: dict[str, float] = {}
    for module, adapter in adapters.items():
        wrapper = model.get_submodule(module)
        assert isinstance(wrapper, AdaptedLayer)
        pair, shift, cfg = adapter.init_factors(), adapter.base_shift(), adapter.config
        assert pair is not None
        A, B = pair
        k = 0 if shift is None else shift.A.shape[0]
        plain = {"init": "default", "init_options": ()} if "init_options" in cfg.__dataclass_fields__ else {}
        configs[module] = new = dataclasses.replace(cfg, r=cfg.r + k, **plain)
        with torch.no_grad():
            A2, B2 = A.float(), B.float() * (adapter.scale / new.scale)  # (r, in), (out, r)
            if shift is not None:
                A2 = torch.cat([A2, shift.A.float()])  # (r + r₀, in)
                B2 = torch.cat([B2, -shift.B.float() * (shift.scale / new.scale)], dim=1)  # (out, r + r₀)
            pairs = {id(A): A2.to(A.dtype), id(B): B2.to(B.dtype)}
            states[module] = {key: pairs.get(id(t), t) for key, t in adapter.export_state().items()}
            if len(prints) < 4:
                W = L.weight_out_in(wrapper.base_layer).float()
                original = W if shift is None else W + shift.scale * (shift.B.float() @ shift.A.float())
                prints[module] = float(original.norm())
    return states, configs, prints
