"""EVA: One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation — https://arxiv.org/abs/2410.07170
Update rule: X − μ = U S Vᵀ (layer inputs); A = V[:, :r_l]ᵀ, B = 0; r_l ∝ explained variance, Σ_l r_l = r·#layers.

Each targeted layer's inputs over the calibration batches (padding, and with ``use_label_mask`` the
-100-labelled positions, dropped) give its principal directions; each layer offers its top
round(ρ·r) explained-variance ratios λ_i/Σλ, and the r·#layers largest over all layers decide the
ranks (a layer may get 0: it is left unadapted). Layers fed the same input (q/k/v) share one
decomposition. ``initialize`` rebuilds each adapter at its new rank (``adjust_scaling_factors``
keeps s = α/r by scaling α with the rank, as PEFT); the saved config carries them in rank_pattern /
alpha_pattern. The PCA is exact over all calibration rows (PEFT sketches it incrementally until
the components converge; on data its sketch captures fully both give the same A and ranks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit import inject  # a module reference: lorakit.inject may still be importing
from lorakit import layers as L
from lorakit.init._calib import Moments, as_batches, base_layer, input_moments
from lorakit.methods._api import register, require
from lorakit.methods.lora import Lora, LoraConfig


@dataclass(frozen=True, kw_only=True)
class EvaConfig(LoraConfig):
    rho: float = 2.0
    """Rank redistribution: a layer may take up to round(rho·r) components (1: no redistribution)."""
    use_label_mask: bool = True
    """Skip positions whose label is -100 (e.g. prompts) when collecting layer inputs."""
    whiten: bool = False
    """Divide each component by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """Scale alpha with the new rank so each layer keeps the scale alpha/r it was configured with."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rho >= 1.0, f"eva: rho must be >= 1 (1 means no redistribution), got {self.rho!r}.")
        require(self.init == "default", f"eva sets A from activations; leave init unset (got {self.init!r}).")
        require(self.train_only is None and not self.lora_bias, "eva does not combine with train_only or lora_bias.")


def principal_directions(stats: Moments, k: int, whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k components (k, d) with PEFT's sign rule, their explained-variance ratios (k,)) of the inputs."""
    scatter = stats.scatter  # (d, d) Σ(x−μ)(x−μ)ᵀ
    evals, evecs = torch.linalg.eigh(scatter)  # ascending
    evals, V = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k].T  # (k,), (k, d)
    V = V * torch.sign(V.gather(1, V.abs().argmax(1, keepdim=True)))  # largest |entry| of each row positive
    if whiten:
        V = V / evals.sqrt().sqrt().clamp_min(1e-12)[:, None]  # ÷ √(singular value)
    return V, evals / scatter.trace().clamp_min(1e-30)


def distribute(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Ranks = how many of each layer's ratios are among the ``budget`` largest overall (ties: earlier layer first)."""
    owners = [name for name, r in ratios.items() for _ in range(r.numel())]
    order = torch.sort(torch.cat(list(ratios.values())), descending=True, stable=True).indices[:budget]
    ranks = dict.fromkeys(ratios, 0)
    for i in order.tolist():
        ranks[owners[i]] += 1
    return ranks


@register(
    "eva",
    config=EvaConfig,
    paper="One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation (EVA)",
    url="https://arxiv.org/abs/2410.07170",
    family="F3",
    params="r*(d_in+d_out)",
    layers=("linear", "conv1d"),
    calibration=True,
)
class Eva(Lora):
    """x ↦ W₀x + s·B·A·x with A = principal directions of the layer's inputs, B = 0, per-layer rank."""

    peft_type = "LORA"

    @classmethod
    def initialize(cls, model: nn.Module, adapters: dict[str, nn.Module], cfg: EvaConfig, batches: Any) -> None:
        """PCA of every targeted layer's inputs, ranks by explained variance, adapters rebuilt at those ranks."""
        configs: dict[str, Any] = {name: a.config for name, a in adapters.items()}
        most = {name: min(round(c.r * cfg.rho), L.dims(base_layer(model, name))[0]) for name, c in configs.items()}
        data = as_batches(batches, need_labels=False, min_rows=max(most.values()), where="eva")
        moments = input_moments(model, list(adapters), data, label_mask=cfg.use_label_mask)
        groups: dict[int, list[str]] = {}  # layers fed the same input share one decomposition (and, as PEFT, one k)
        for name in adapters:
            require(name in moments, f"eva: {name} received no input during the calibration forward passes.")
            groups.setdefault(id(moments[name]), []).append(name)
        comps: dict[str, torch.Tensor] = {}
        ratios: dict[str, torch.Tensor] = {}
        for members in groups.values():
            k, stats = max(most[n] for n in members), moments[members[0]]
            require(
                stats.n >= k,
                f"eva: {members[0]} saw {stats.n} token rows (after masking) but needs at least {k} = "
                "round(rho·r) for its components; pass more calibration data or set use_label_mask=false.",
            )
            V, ratio = principal_directions(stats, k, cfg.whiten)
            comps |= dict.fromkeys(members, V)
            ratios |= dict.fromkeys(members, ratio)
        ranks = distribute({n: ratios[n] for n in adapters}, budget=sum(c.r for c in configs.values()))
        for name, adapter in adapters.items():
            cls.resize(model, name, adapter, ranks[name], comps[name][: ranks[name]])

    @classmethod
    def resize(cls, model: nn.Module, name: str, old: nn.Module, rank: int, A: torch.Tensor) -> None:
        """Replace ``old`` on module ``name`` by an adapter of ``rank`` with A (rank, in), B = 0; rank 0 removes it."""
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, inject.AdaptedLayer)
        key = next(k for k, a in wrapper.adapters.items() if a is old)
        if rank == 0:  # no component earned here: the layer stays unadapted (PEFT drops its LoRA layer too)
            del wrapper.adapters[key]
            inject.adapter_info(model, key).modules.remove(name)
            if len(wrapper.adapters) == 0:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, wrapper.base_layer)
            return
        cfg: Any = old.config
        alpha = cfg.alpha * rank / cfg.r if cfg.adjust_scaling_factors else cfg.alpha
        base = wrapper.base_layer
        new = cls(dataclasses.replace(cfg, r=rank, alpha=alpha), *L.dims(base), L.layer_kind(base), base.weight)  # type: ignore[arg-type]
        with torch.no_grad():
            new.A.copy_(A)
            new.B.zero_()
        new.train(old.training)
        new.requires_grad_(any(p.requires_grad for p in old.parameters()))
        wrapper.adapters[key] = new

    @staticmethod
    def peft_fields(cfg: LoraConfig) -> dict[str, Any]:
        assert isinstance(cfg, EvaConfig)
        sub = {"rho": cfg.rho, "tau": 0.99, "use_label_mask": cfg.use_label_mask, "label_mask_value": -100}
        sub |= {"whiten": cfg.whiten, "adjust_scaling_factors": cfg.adjust_scaling_factors}
        return Lora.peft_fields(cfg) | {"init_lora_weights": "eva", "eva_config": sub}
