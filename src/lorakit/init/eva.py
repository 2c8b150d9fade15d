"""EVA: One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation — https://arxiv.org/abs/2410.07170
Update rule: X − μ = U S Vᵀ (layer inputs); A = V[:, :r_l]ᵀ, B = 0; r_l ∝ explained variance, Σ_l r_l = r·#layers.

Each targeted layer's inputs over the calibration batches (padding, and with ``use_label_mask`` the
-100-labelled positions, dropped) give its principal directions; each layer offers its top
round(ρ·r) explained-variance ratios λ_i/Σλ, and the r·#layers largest over all layers decide the
ranks (a layer may get 0: it is left unadapted). Layers fed the same input (q/k/v) share one
decomposition. Core rebuilds each adapter at its new rank (``adjust_scaling_factors``
keeps s = α/r by scaling α with the rank, as PEFT); the saved config carries them in rank_pattern /
alpha_pattern. The PCA is exact over all calibration rows (PEFT sketches it incrementally until
the components converge; on data its sketch captures fully both give the same A and ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._api import InitContext, InitFactors, register_init
from lorakit.init._calib import Moments, as_batches, input_moments


@dataclass(frozen=True, kw_only=True)
class EvaOptions:
    rho: float = 2.0
    """Rank redistribution: a layer may take up to round(rho·r) components (1: no redistribution)."""
    use_label_mask: bool = True
    """Skip positions whose label is -100 (e.g. prompts) when collecting layer inputs."""
    whiten: bool = False
    """Divide each component by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """Scale alpha with the new rank so each layer keeps the scale alpha/r it was configured with."""

    def __post_init__(self) -> None:
        if not self.rho >= 1.0:
            raise ConfigError(f"eva: rho must be >= 1 (1 means no redistribution), got {self.rho!r}.")


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


def peft_fields(opts: EvaOptions) -> dict[str, Any]:
    sub = {"rho": opts.rho, "tau": 0.99, "use_label_mask": opts.use_label_mask, "label_mask_value": -100}
    sub |= {"whiten": opts.whiten, "adjust_scaling_factors": opts.adjust_scaling_factors}
    return {"init_lora_weights": "eva", "eva_config": sub}


@register_init(
    "eva",
    options=EvaOptions,
    paper="One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation (EVA)",
    url="https://arxiv.org/abs/2410.07170",
    calibration=True,
    peft=peft_fields,
)
def eva(ctx: InitContext, opts: EvaOptions) -> dict[str, InitFactors]:
    """PCA of every targeted layer's inputs, ranks by explained variance, A = the top components, B = 0."""
    targets = ctx.targets
    most = {name: min(round(t.r * opts.rho), L.dims(t.base)[0]) for name, t in targets.items()}
    data = as_batches(ctx.batches, need_labels=False, min_rows=max(most.values()), where="eva")
    moments = input_moments(ctx.model, list(targets), data, label_mask=opts.use_label_mask)
    groups: dict[int, list[str]] = {}  # layers fed the same input share one decomposition (and, as PEFT, one k)
    for name in targets:
        if name not in moments:
            raise ConfigError(f"eva: {name} received no input during the calibration forward passes.")
        groups.setdefault(id(moments[name]), []).append(name)
    comps: dict[str, torch.Tensor] = {}
    ratios: dict[str, torch.Tensor] = {}
    for members in groups.values():
        k, stats = max(most[n] for n in members), moments[members[0]]
        if stats.n < k:
            raise ConfigError(
                f"eva: {members[0]} saw {stats.n} token rows (after masking) but needs at least {k} = "
                "round(rho·r) for its components; pass more calibration data or set use_label_mask=false."
            )
        V, ratio = principal_directions(stats, k, opts.whiten)
        comps |= dict.fromkeys(members, V)
        ratios |= dict.fromkeys(members, ratio)
    ranks = distribute({n: ratios[n] for n in targets}, budget=sum(t.r for t in targets.values()))
    out = {}
    for name, t in targets.items():
        k = ranks[name]
        A = comps[name][:k].float()  # (k, in); k = 0: no component earned here, the layer stays unadapted
        alpha = t.alpha * k / t.r if opts.adjust_scaling_factors else t.alpha
        out[name] = InitFactors(A, A.new_zeros(L.dims(t.base)[1], k), alpha=alpha)
    return out
