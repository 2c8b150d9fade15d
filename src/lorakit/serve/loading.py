"""Adapters into the serving form: plain (A, scale·B) factors per module, checked against the served base.

A plain LoRA dir is read directly. Any other method is loaded onto the base model for a moment
(``lk.load_adapter``) and converted layer by layer through its ``to_lora`` — exact for the
LoRA-shaped methods, the best rank-r form otherwise — then detached again. Whole replaced
modules (``modules_to_save``) and embedding adapters cannot be served as deltas on the shared
base; they get a clear error that says what to do instead.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.errors import AdapterFormatError
from lorakit.io.adapter import read_config
from lorakit.io.factors import AdapterFactors, read_factors
from lorakit.io.peft_format import check_base_norms, is_plain_lora
from lorakit.serve.plan import CompressedSet
from lorakit.serve.slots import Factors

if TYPE_CHECKING:
    from lorakit.methods._api import AdapterModule


CONVERT_NAME = "_lorakit_serve_convert"


def _check_base(
    where: Path, fingerprint: dict[str, float], base_name: str | None, weights: dict[str, torch.Tensor | None]
) -> None:
    norms = {m: float(w.detach().float().norm()) for m in fingerprint if (w := weights.get(m)) is not None}
    check_base_norms(where, fingerprint, norms, base_name=base_name, fix="Serve it on its own base.")


def _as_served(where: Path, f: AdapterFactors, weights: dict[str, torch.Tensor | None]) -> Factors:
    if f.saved:
        raise AdapterFormatError(
            f"{where} replaces whole modules ({', '.join(sorted(f.saved))}), which one shared base cannot serve per "
            "request; merge it into the base (`lorakit merge --into-base`) and serve that as its own base."
        )
    out: Factors = {}
    for module, fac in f.factors.items():
        w = weights.get(module)
        if f.kinds.get(module) == "embedding" or w is None:
            raise AdapterFormatError(
                f"{where} adapts {module}, which is not a linear layer of the served base; only linear-layer "
                "adapters are served."
            )
        A, B = fac.A.to(w.dtype), (fac.B.float() * fac.scale).to(w.dtype)
        if A.shape[1] != w.shape[1] or B.shape[0] != w.shape[0]:
            raise AdapterFormatError(
                f"{where}: {module} has A {tuple(A.shape)} and B {tuple(B.shape)}, but the base layer is "
                f"{tuple(w.shape)} (out, in)."
            )
        out[module] = (A.contiguous(), B.contiguous())
    return out


def load_factors(
    model: nn.Module, path: Path, weights: dict[str, torch.Tensor | None], lock: threading.RLock
) -> Factors:
    """The served form of the adapter dir ``path`` on ``model`` (whose served weights are ``weights``)."""
    if is_plain_lora(read_config(path)):
        f = read_factors(path)
        _check_base(path, f.fingerprint, f.base_name, weights)
        return _as_served(path, f, weights)
    with lock:  # the model is briefly changed: no forward may run meanwhile
        return _as_served(path, _convert(model, path), weights)


def _convert(model: nn.Module, path: Path) -> AdapterFactors:
    """Load a non-LoRA adapter onto ``model`` for a moment and read every layer's ``to_lora``."""
    import lorakit as lk
    from lorakit.inject import saved_modules, wrappers
    from lorakit.layers import layer_kind

    lk.load_adapter(model, path, name=CONVERT_NAME)
    try:
        factors, kinds = {}, {}
        for name, wrapper in wrappers(model):
            if CONVERT_NAME in wrapper.adapters:
                adapter: AdapterModule = wrapper.adapters[CONVERT_NAME]  # type: ignore[assignment]
                factors[name] = adapter.to_lora(wrapper.base_layer)
                kinds[name] = layer_kind(wrapper.base_layer)
        saved: dict[str, dict[str, torch.Tensor]] = {n: {} for n, h in saved_modules(model) if CONVERT_NAME in h.copies}
        return AdapterFactors(factors, kinds, saved)
    finally:
        lk.delete_adapter(model, CONVERT_NAME)


def load_collection(path: str | Path, weights: dict[str, torch.Tensor | None]) -> CompressedSet:
    """A compressed collection (``lorakit compress``) in the served form, checked against the base."""
    from lorakit.io.collection import Collection

    coll = Collection.load(path)
    _check_base(Path(path), coll.fingerprint or {}, coll.base_name, weights)
    modules = {}
    for module, (U, V, cores) in coll.modules().items():
        w = weights.get(module)
        if w is None or U.shape[0] != w.shape[0] or V.shape[0] != w.shape[1]:
            raise AdapterFormatError(f"{path}: module {module} does not match a linear layer of the served base.")
        modules[module] = (U.to(w.dtype).contiguous(), V.to(w.dtype).contiguous(), cores.to(w.dtype).contiguous())
    return CompressedSet(modules, list(coll.names))
