"""GoRA: Gradient-driven Adaptive Low Rank Adaptation — https://arxiv.org/abs/2502.12171
Update rule: h = W₀x + s_i·B·A·x with rank r_i ∝ importance I_i = mean|W_i ⊙ G_i|, A random, B₀ = −(ξ/s_i)·G·A⁺.

As the authors' code (github.com/hhnqqq/MyTransformers, common/lora_modules/gora.py, and their Llama scripts):
G = ∇_W L(W₀) over the calibration batches; the parameter budget b = Σ_i r·(d_in,i + d_out,i) (what rank-r LoRA
would train on the same modules) is shared in proportion to the importances, r_i = round(b·I_i/ΣI / (d_in,i+d_out,i))
clamped to [r_min, r_max] (defaults r/2 and 4r, their 4 and 32 at r = 8); s_i = α/√r_i (rsLoRA on the module's own
rank, α = 16). A is Kaiming-uniform (as LoRA) and B = −(ξ/s_i)·G·Aᵀ(AAᵀ)⁻¹ with ξ = η·√(d_in/r_i), so that
s_i·B₀·A = −η·√(d_in/r_i)·G·P_A, P_A = A⁺A: the gradient step projected on A's row space (the best any B can do
with this A), rescaled by √(d_in/r_i) to the full step's expected size (their scale_by_lr, η = 5e-2). The base weight
is NOT shifted (the paper's "non-manipulative" init): the model starts at that approximate step. Ranks differ per
module: ``initialize`` resizes the adapters attach built at rank r, and saving writes them as PEFT's rank_pattern.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.init._calib import as_batches, base_layer, full_gradients
from lorakit.methods._api import register, require
from lorakit.methods.lora import Lora, LoraConfig

IMPORTANCES = ("weight_grad", "grad_nuclear")


@dataclass(frozen=True, kw_only=True)
class GoraConfig(LoraConfig):
    alpha: float = 16.0
    """Scaling numerator: each module's update is multiplied by alpha/sqrt(r_i) (its own rank; the authors' 16)."""
    rslora: bool = True
    """Scale by alpha/sqrt(r_i) (the authors' rank-stabilised, per-module 'dynamic' scaling)."""
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
        super().__post_init__()
        require(self.init == "default", "gora initialises B from the gradient; leave init='default'.")
        require(self.train_only is None, "gora trains both factors; train_only does not apply.")
        require(self.eta > 0, f"eta must be > 0, got {self.eta!r}.")
        require(self.importance in IMPORTANCES, f"importance must be one of {IMPORTANCES}, got {self.importance!r}.")
        require(self.budget is None or self.budget > 0, f"budget must be a positive int or None, got {self.budget!r}.")
        lo, hi = self.rank_bounds()
        require(1 <= lo <= hi, f"need 1 <= r_min <= r_max, got r_min={lo}, r_max={hi}.")

    def rank_bounds(self) -> tuple[int, int]:
        return (max(1, self.r // 2) if self.r_min is None else self.r_min), (
            4 * self.r if self.r_max is None else self.r_max
        )


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


@register(
    "gora",
    config=GoraConfig,
    paper="GoRA: Gradient-driven Adaptive Low Rank Adaptation",
    url="https://arxiv.org/abs/2502.12171",
    family="F3",
    params="r*(d_in+d_out) + (d_out if lora_bias else 0)",  # r = the module's allocated rank (its config's r)
    identity_at_init=False,  # the init IS an approximate gradient step; the base is not shifted
    layers=("linear", "conv1d"),
    calibration=True,
)
class Gora(Lora):
    """LoRA with a gradient-allocated rank per module and B initialised by compressing the gradient through A."""

    config: GoraConfig

    @classmethod
    def initialize(
        cls, model: nn.Module, adapters: dict[str, nn.Module], cfg: GoraConfig, batches: list[dict] | None
    ) -> None:
        """Allocate ranks by importance under the budget, then resize each adapter and set A, B (see below)."""
        mine = {name: a for name, a in adapters.items() if isinstance(a, Gora)}
        data = as_batches(batches, need_labels=True, where="gora")
        grads = full_gradients(model, list(mine), data)
        bases = {name: base_layer(model, name) for name in mine}
        dims = {name: L.dims(b) for name, b in bases.items()}
        scores = {n: importance(L.weight_out_in(b).detach(), grads[n], cfg.importance) for n, b in bases.items()}
        budget = cfg.budget or sum(a.config.r * sum(dims[n]) for n, a in mine.items())
        ranks = allocate_ranks(scores, dims, budget, cfg.rank_bounds())
        for name, adapter in mine.items():
            adapter.set_from_gradient(grads[name], ranks[name])

    @torch.no_grad()
    def set_from_gradient(self, grad: torch.Tensor, rank: int) -> None:
        """Resize to ``rank``; A Kaiming-uniform (r, in), B = −(ξ/s)·G·Aᵀ(AAᵀ)⁻¹ (out, r), ξ = η·√(d_in/r)."""
        self.config = dataclasses.replace(self.config, r=rank)
        self.scale = self.config.scale
        d_out, d_in = grad.shape
        like = self.A
        A = torch.empty(rank, d_in, dtype=torch.float32, device=like.device)  # (r, in)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        xi = self.config.eta * math.sqrt(d_in / rank)
        B = torch.linalg.solve(A @ A.T, A @ grad.float().T).T * (-xi / self.scale)  # G·Aᵀ(AAᵀ)⁻¹: (out, r)
        self.A = nn.Parameter(A.to(like.dtype), requires_grad=like.requires_grad)
        self.B = nn.Parameter(B.to(like.dtype), requires_grad=self.B.requires_grad)

    @staticmethod
    def config_from_peft(fields: dict[str, object]) -> LoraConfig | None:
        return None  # a saved GoRA adapter is a plain LoRA with a rank_pattern: it loads as 'lora'
