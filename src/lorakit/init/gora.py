"""GoRA: Gradient-driven Adaptive Low Rank Adaptation — https://arxiv.org/abs/2502.12171
Update rule: h = W₀x + s_i·B·A·x with rank r_i ∝ importance I_i = mean|W_i ⊙ G_i|, A random, B₀ = −(ξ/s_i)·G·A⁺.

As the authors' code (github.com/hhnqqq/MyTransformers, common/lora_modules/gora.py, and their Llama scripts):
G = ∇_W L(W₀) over the calibration batches; the parameter budget b = Σ_i r·(d_in,i + d_out,i) (what rank-r LoRA
would train on the same modules) is shared in proportion to the importances, r_i = round(b·I_i/ΣI / (d_in,i+d_out,i))
clamped to [r_min, r_max] (defaults r/2 and 4r, their 4 and 32 at r = 8); s_i = α/√r_i (rsLoRA on the module's own
rank, the authors run α = 16 with rslora: set them on the method). A is Kaiming-uniform (as LoRA) and
B = −(ξ/s_i)·G·Aᵀ(AAᵀ)⁻¹ with ξ = η·√(d_in/r_i), so that
s_i·B₀·A = −η·√(d_in/r_i)·G·P_A, P_A = A⁺A: the gradient step projected on A's row space (the best any B can do
with this A), rescaled by √(d_in/r_i) to the full step's expected size (their scale_by_lr, η = 5e-2). The base weight
is NOT shifted (the paper's "non-manipulative" init): the model starts at that approximate step. Ranks differ per
module: Core rebuilds the adapters attach built at rank r, and saving writes them as PEFT's rank_pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._api import InitContext, InitFactors, register_init
from lorakit.init._calib import as_batches, full_gradients

IMPORTANCES = ("weight_grad", "grad_nuclear")


@dataclass(frozen=True, kw_only=True)
class GoraOptions:
    eta: float = 5e-2
    """η of the approximated gradient step s·B₀·A ≈ −η·G (the authors' gora_lr)."""
    importance: str = "weight_grad"
    """'weight_grad': I = mean|W ⊙ G| (the authors' runs); 'grad_nuclear': I = ‖G‖_* (nuclear norm)."""
    budget: int | None = None
    """Trainable parameters shared out; None = Σ r·(d_in+d_out) over the targeted modules (rank-r LoRA's count)."""
    r_min: int | None = None
    """Smallest rank a module gets; None = max(1, r // 2)."""
    r_max: int | None = None
    """Largest rank a module gets; None = 4·r (also never above min(d_in, d_out))."""

    def __post_init__(self) -> None:
        for ok, message in (
            (self.eta > 0, f"eta must be > 0, got {self.eta!r}."),
            (self.importance in IMPORTANCES, f"importance must be one of {IMPORTANCES}, got {self.importance!r}."),
            (self.budget is None or self.budget > 0, f"budget must be a positive int or None, got {self.budget!r}."),
            (self.r_min is None or self.r_min >= 1, f"r_min must be >= 1, got {self.r_min!r}."),
            (self.r_max is None or self.r_max >= (self.r_min or 1), f"need r_min <= r_max, got {self.r_max!r}."),
        ):
            if not ok:
                raise ConfigError(f"gora: {message}")

    def rank_bounds(self, r: int) -> tuple[int, int]:
        return (max(1, r // 2) if self.r_min is None else self.r_min), (4 * r if self.r_max is None else self.r_max)


def importance(weight: torch.Tensor, grad: torch.Tensor, kind: str) -> float:
    """The paper's sensitivity of a weight: mean|W ⊙ G| or the nuclear norm ‖G‖_*, both (out, in)."""
    if kind == "grad_nuclear":
        return float(torch.linalg.matrix_norm(grad.float(), ord="nuc"))
    return float((weight.float() * grad.float()).abs().mean())


def allocate_ranks(
    scores: dict[str, float], dims: dict[str, tuple[int, int]], budget: int, bounds: tuple[int, int]
) -> dict[str, int]:
    """r_i = round(budget·I_i/ΣI / (d_in,i + d_out,i)), clamped to [r_min, min(r_max, d_in,i, d_out,i)]."""
    total = sum(scores.values())
    if not total > 0:
        raise ConfigError(
            "gora: every targeted weight has zero gradient importance on the calibration batches; "
            "check that the batches carry 'labels' that are not all -100."
        )
    ranks = {}
    for name, score in scores.items():
        d_in, d_out = dims[name]
        r = round(budget * score / total / (d_in + d_out))
        ranks[name] = max(bounds[0], min(r, bounds[1], d_in, d_out))
    return ranks


def from_gradient(grad: torch.Tensor, rank: int, scale: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A Kaiming-uniform (r, in), B = −(ξ/s)·G·Aᵀ(AAᵀ)⁻¹ (out, r), ξ = η·√(d_in/r)."""
    d_out, d_in = grad.shape
    A = torch.empty(rank, d_in, dtype=torch.float32, device=grad.device)  # (r, in)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    xi = eta * math.sqrt(d_in / rank)
    B = torch.linalg.solve(A @ A.T, A @ grad.float().T).T * (-xi / scale)  # G·Aᵀ(AAᵀ)⁻¹: (out, r)
    return A, B


@register_init(
    "gora",
    options=GoraOptions,
    paper="GoRA: Gradient-driven Adaptive Low Rank Adaptation",
    url="https://arxiv.org/abs/2502.12171",
    calibration=True,
    identity_at_init=False,  # the init IS an approximate gradient step; the base is not shifted
    peft=lambda _: {"init_lora_weights": True},  # a plain LoRA with a rank_pattern once initialised
)
def gora(ctx: InitContext, opts: GoraOptions) -> dict[str, InitFactors]:
    """Allocate ranks by importance under the budget, then A, B per module at its rank (see above)."""
    data = as_batches(ctx.batches, need_labels=True, where="gora")
    grads = full_gradients(ctx.model, list(ctx.targets), data)
    dims = {name: L.dims(t.base) for name, t in ctx.targets.items()}
    weights = {name: L.weight_out_in(t.base).detach() for name, t in ctx.targets.items()}
    scores = {n: importance(weights[n], grads[n], opts.importance) for n in ctx.targets}
    budget = opts.budget or sum(t.r * sum(dims[n]) for n, t in ctx.targets.items())
    r = max(t.r for t in ctx.targets.values())
    lo, hi = opts.rank_bounds(r)
    if not 1 <= lo <= hi:
        raise ConfigError(f"gora: need 1 <= r_min <= r_max, got r_min={lo}, r_max={hi}.")
    ranks = allocate_ranks(scores, dims, budget, (lo, hi))
    out = {}
    for name, t in ctx.targets.items():
        A, B = from_gradient(grads[name], ranks[name], t.scale_for(ranks[name], t.alpha), opts.eta)
        out[name] = InitFactors(A, B)
    return out
