"""shears: Shears, Unstructured Sparsity with Neural Low-rank Adapter Search — https://arxiv.org/abs/2404.10934

First the base is sparsified, Wanda-style (https://arxiv.org/abs/2306.11695): in every adapted linear layer the
k = round(sparsity·d_out·d_in) weights with the smallest |W_ij|·‖X_j‖₂ (X_j: input feature j over the calibration
tokens) are set to zero — ⌊k/d_out⌋ per output row, the few left over globally — so each layer reaches the target
sparsity exactly. Then the adapters train as an elastic super-adapter (Neural Low-rank adapter Search, shared with
lonas in ``_elastic.py``): each step a sub-adapter, module m at rank c_m ∈ ``ranks``, h = W_s·x + (α/c_m)·B[:, :c_m]
·A[:c_m]·x. ``search`` / ``extract`` (or ``budget=``) give the best sub-adapter within a parameter budget.

Calibration data: the run's first micro-batch (the callback sees no other data; :func:`wanda_prune` takes any
batches from Python). The sparse base: ``masks=PATH`` writes the keep masks (module -> bool (d_out, d_in)) as
safetensors, and :func:`apply_masks` makes the sparse base from the dense one with them. :func:`merge` folds the
adapter in as W_s + M⊙ΔW (M: the base's non-zeros), so the merged model keeps the sparsity exactly; it differs
from the unmerged sparse model + adapter by the masked-out part of ΔW (Shears itself serves the adapter unmerged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.inject import active_layers
from lorakit.inject import merge as merge_adapter
from lorakit.io.atomic import atomic_write_bytes
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._elastic import ElasticLora, backbone, extract, search, use_config

__all__ = ["Shears", "apply_masks", "extract", "merge", "search", "use_config", "wanda_prune"]


def prune_scores(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool (d_out, d_in) mask of the k = round(sparsity·numel) lowest scores: ⌊k/d_out⌋ per row, the rest the
    globally lowest of what is left (exactly k entries)."""
    out, k = score.shape[0], round(sparsity * score.numel())
    pruned = torch.zeros_like(score, dtype=torch.bool)  # (d_out, d_in)
    pruned.scatter_(1, score.argsort(dim=1)[:, : k // out], True)  # Wanda's per-output groups
    left = k - int(pruned.sum())
    if left:
        rest = score.masked_fill(pruned, float("inf")).flatten()  # (d_out·d_in,)
        pruned.view(-1)[rest.topk(left, largest=False).indices] = True
    return pruned


def linear_layers(model: nn.Module, name: str = "shears") -> list[tuple[str, Any]]:
    """(module, wrapper) of every active adapter, whose base must be a full-precision nn.Linear."""
    found = []
    for m, w, _ in active_layers(model):
        base: Any = w.base_layer
        if L.layer_kind(base) != "linear" or L.is_quantized(base) or not base.weight.is_floating_point():
            raise ConfigError(
                f"{name}: {m} is a {type(base).__name__} layer; Wanda sparsity is built for full-precision nn.Linear "
                "bases only (target the linear projections, without a quantized base)."
            )
        found.append((m, w))
    return found


def wanda_prune(model: nn.Module, batches: list[dict[str, Any]], sparsity: float) -> dict[str, torch.Tensor]:
    """Zero exactly round(sparsity·numel) weights of every adapted linear base by |W|·‖x‖ (norms over ``batches``,
    model kwargs such as input_ids / attention_mask, run on the base alone); returns module -> bool keep mask."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"shears: sparsity must be a number in [0, 1), got {sparsity!r}.")
    layers, norms, hooks = linear_layers(model), {}, []
    current: dict[str, Any] = {}
    for m, w in layers:
        norms[m] = torch.zeros(w.base_layer.in_features, dtype=torch.float64, device=w.base_layer.weight.device)

        def collect(module: nn.Module, args: tuple, m: str = m) -> None:
            x2 = args[0].detach().double().pow(2)  # (..., T, d_in)
            if current.get("mask") is not None and x2.dim() == 3:
                x2 = x2 * current["mask"][..., None].to(x2)  # padding does not count
            norms[m] += x2.reshape(-1, x2.shape[-1]).sum(0)  # (d_in,)

        hooks.append(w.base_layer.register_forward_pre_hook(collect))
    actives = {m: w.active for m, w in layers}
    try:
        for _, w in layers:
            w.active = None  # the base alone
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
        for m, w in layers:
            w.active = actives[m]
    keep = {}
    with torch.no_grad():
        for m, w in layers:
            W = w.base_layer.weight  # (d_out, d_in)
            pruned = prune_scores(W.abs().double() * norms[m].sqrt(), float(sparsity))  # |W_ij|·‖X_j‖
            W.masked_fill_(pruned, 0)
            keep[m] = ~pruned.cpu()
    return keep


def apply_masks(model: nn.Module, path: str | Path) -> nn.Module:
    """Zero the weights the masks file (written by ``shears:masks=PATH``) drops, in the base or adapted model."""
    for m, keep in safetensors.torch.load_file(str(path)).items():
        layer = model.get_submodule(m)
        weight: Any = getattr(layer, "base_layer", layer).weight
        with torch.no_grad():
            weight.masked_fill_(~keep.to(weight.device), 0)
    return model


def merge(model: nn.Module) -> nn.Module:
    """A plain merged copy whose weights are W_s + M⊙ΔW (M = the sparse base's non-zeros): the sparsity stays."""
    zero = {m: w.base_layer.weight == 0 for m, w in linear_layers(model)}
    out = merge_adapter(model)
    with torch.no_grad():
        for m, z in zero.items():
            out.get_submodule(m).weight.masked_fill_(z, 0)  # type: ignore[operator]
    return out


@register_callback(
    "shears",
    help="Shears: Wanda-sparsifies the adapted linear bases to sparsity= exactly (first micro-batch as calibration), "
    "then trains lora adapters as an elastic super-adapter over ranks= (e.g. 2|4|8); with budget= (parameters) "
    "searches the best sub-adapter within it at the end. Options: ranks, sparsity, budget, samples, eval_batches, "
    "masks (a file for the sparse base's masks).",
)
class Shears(ElasticLora):
    name = "shears"

    def __init__(
        self,
        ranks: Any,
        sparsity: float = 0.5,
        budget: int | None = None,
        samples: int = 16,
        eval_batches: int = 4,
        masks: str | None = None,
    ):
        super().__init__(ranks, budget, samples, eval_batches)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise ConfigError(f"shears: sparsity must be a number in [0, 1), got {sparsity!r}.")
        self.sparsity, self.masks_path = float(sparsity), masks
        self.keep: dict[str, torch.Tensor] = {}
        self.calibration: Any = None

    def check(self, model: nn.Module) -> dict[str, Lora]:
        linear_layers(model)
        return super().check(model)

    def on_step_begin(self, state: TrainState) -> None:
        if not self.keep and self.calibration is None:
            if state.step > 0:
                raise ConfigError("shears: a resumed run cannot continue (the sparse base is not in the checkpoint).")
            self.check(state.model)
            model = state.model
            self.calibration = backbone(model).register_forward_pre_hook(
                lambda module, args, kwargs: self.prune(model, kwargs), with_kwargs=True
            )
        super().on_step_begin(state)

    def prune(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Before the first forward computes anything: Wanda on its micro-batch, then the forward goes on."""
        self.calibration.remove()
        batch = {k: kwargs[k] for k in ("input_ids", "attention_mask") if kwargs.get(k) is not None}
        self.keep = wanda_prune(model, [batch], self.sparsity)
        if self.masks_path is not None:
            atomic_write_bytes(
                self.masks_path, safetensors.torch.save({k: v.contiguous() for k, v in self.keep.items()})
            )
