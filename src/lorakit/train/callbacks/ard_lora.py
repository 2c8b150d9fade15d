"""ard_lora: ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of Foundation Models with
Heterogeneous Adaptation Needs (https://arxiv.org/abs/2506.18267) for plain ``lora`` adapters. Rule:
h = W₀x + s·B·diag(g)·A·x with a learnable scaling factor g_i per rank component (init 1), trained on
L_task + λ₁·Σ|g| + λ_tv·Σ_types Σ_l |ā_l − ā_{l+1}|, ā_l = mean_i |g_{l,i}| the scale of the module of that type
in layer l (total variation across depth); the effective rank of a module is #{i : |g_i| > threshold}.

- At the first step every adapter's B is reparametrised as B·diag(g) (``torch.nn.utils.parametrize``: exact, the
  chain rule to B and g is autograd's, the fused LoRA kernel still runs); the gates have an Adam of their own
  (``gate_lr`` × the run's schedule factor, no weight decay), stepped right after the loop's optimizer (a param
  group added to the loop's optimizer would not be in its scheduler).
- After each backward the regulariser's (sub)gradient (:func:`regulariser_grad`, sign(0) = 0) is added to the
  gates' gradients, before clipping and the optimizer step.
- At the end g is folded into B (outputs unchanged) and the ``budget`` components of largest |g| over all modules
  are kept (each module's largest first, so one each at least): the saved dir is an ordinary PEFT LoRA with a
  ``rank_pattern``. Dropped components with g ≠ 0 change the output by what they contributed.

Departures from the paper, on purpose: its factors scale whole heads' ranks (r = r₀·α); a LoRA module here spans
all heads, so the factors are per rank component, and TV acts on each module's mean |g| (per-component TV would
pair components of neighbouring layers by index, which means nothing: components are permutation-symmetric).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._rank import top_k


class Gate(nn.Module):
    """The parametrization B ↦ B·diag(g) of a LoRA adapter's B (out, r), g (r,)."""

    def __init__(self, r: int, like: torch.Tensor):
        super().__init__()
        self.g = nn.Parameter(torch.ones(r, dtype=like.dtype, device=like.device))  # (r,)

    def forward(self, B: torch.Tensor) -> torch.Tensor:
        return B * self.g  # (out, r) · (r,) broadcast over columns


def regulariser(groups: list[list[torch.Tensor]], l1: float, tv: float) -> torch.Tensor:
    """λ₁·Σ|g| + λ_tv·Σ_groups Σ_l |ā_l − ā_{l+1}|, ā_l = mean |g_l|; ``groups``: the gates of one module type in
    layer order."""
    total: Any = 0.0
    for gs in groups:
        total = total + l1 * sum(g.abs().sum() for g in gs)
        scale = [g.abs().mean() for g in gs]  # ā_l
        for here, below in zip(scale, scale[1:], strict=False):
            total = total + tv * (here - below).abs()
    return torch.as_tensor(total)


def regulariser_grad(groups: list[list[torch.Tensor]], l1: float, tv: float) -> list[list[torch.Tensor]]:
    """∂/∂g of :func:`regulariser`: λ₁·sign(g) + λ_tv·sign(g)/r_l·(sign(ā_l − ā_{l+1}) − sign(ā_{l−1} − ā_l))."""
    out = []
    for gs in groups:
        scale = torch.stack([g.detach().abs().mean() for g in gs])  # (L,) ā_l
        step = torch.sign(scale[:-1] - scale[1:])  # (L−1,) sign(ā_l − ā_{l+1})
        down = torch.cat([step, step.new_zeros(1)])  # (L,) the term with the next layer
        up = torch.cat([step.new_zeros(1), step])  # (L,) the term with the previous layer
        signs = [torch.sign(g.detach()) for g in gs]
        out.append([l1 * s + tv * s / s.numel() * (down[i] - up[i]) for i, s in enumerate(signs)])
    return out


@register_callback(
    "ard_lora",
    help="ARD-LoRA: a learnable scale per 'lora' rank component with ℓ1 + total-variation (across depth) "
    "regularisers; the budget's largest scales are kept at the end. Options: budget, l1, tv, threshold, gate_lr.",
)
class ArdLoraAllocator(RankAllocator):
    name = "ard_lora"

    def __init__(
        self, budget: int, l1: float = 1e-3, tv: float = 1e-3, threshold: float = 0.1, gate_lr: float | None = None
    ):
        """``budget``: total rank kept at the end; ``l1`` / ``tv``: the regulariser weights λ₁ / λ_tv;
        ``threshold``: |g| above which a component counts in the effective rank; ``gate_lr``: the gates' learning
        rate (default: the run's ``lr``)."""
        super().__init__(budget)
        for key, value in (("l1", l1), ("tv", tv), ("threshold", threshold), ("gate_lr", gate_lr)):
            if value is None and key == "gate_lr":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ConfigError(f"{self.name}: {key} must be a number >= 0, got {value!r}.")
        if gate_lr is not None and gate_lr <= 0:
            raise ConfigError(f"{self.name}: gate_lr must be > 0, got {gate_lr!r}.")
        self.l1, self.tv, self.threshold, self.gate_lr = float(l1), float(tv), float(threshold), gate_lr
        self.modules: list[Layer] = []  # (name, wrapper, adapter) with gates, in model order
        self.gates: dict[str, nn.Parameter] = {}
        self.groups: list[list[str]] = []  # module names of one type, in layer order
        self.optimizer: torch.optim.Optimizer | None = None  # the gates' own Adam
        self.lr = 0.0
        self.history: list[tuple[int, float, dict[str, int]]] = []  # (step, regulariser, effective ranks)
        self.ranks: dict[str, int] = {}

    def on_step_begin(self, state: TrainState) -> None:
        super().on_step_begin(state)
        if not self.modules:
            self.install(self.layers(state.model), self.gate_lr or state.config.lr)

    def install(self, layers: list[Layer], lr: float = 1e-3) -> None:
        """Gate every adapter's B (g = 1: outputs unchanged); the gates' Adam at rate ``lr``."""
        types: dict[str, list[str]] = {}
        for name, _, a in layers:
            gate = Gate(int(a.config.r), a.B)
            parametrize.register_parametrization(a, "B", gate)
            self.gates[name] = gate.g
            types.setdefault(re.sub(r"\.\d+\.", ".#.", name), []).append(name)  # same module type, any layer
        self.modules, self.groups = layers, list(types.values())
        self.optimizer, self.lr = torch.optim.Adam(list(self.gates.values()), lr=lr), lr

    def grouped(self) -> list[list[torch.Tensor]]:
        return [[self.gates[n] for n in names] for names in self.groups]

    def effective_ranks(self) -> dict[str, int]:
        """#{i : |g_i| > threshold} of every module."""
        return {n: int((g.detach().abs() > self.threshold).sum()) for n, g in self.gates.items()}

    def after_backward(self, state: TrainState) -> None:
        groups = self.grouped()
        with torch.no_grad():
            for gs, grads in zip(groups, regulariser_grad(groups, self.l1, self.tv), strict=True):
                for g, d in zip(gs, grads, strict=True):
                    g.grad = d.clone() if g.grad is None else g.grad + d
            value = float(regulariser(groups, self.l1, self.tv))
        self.history.append((state.step, value, self.effective_ranks()))

    def after_optimizer_step(self, state: TrainState) -> None:
        """Step the gates (gradients clipped with the rest by the loop) at ``gate_lr`` × the schedule's factor."""
        if self.optimizer is None:
            return
        factor = state.metrics.get("lr", state.config.lr) / state.config.lr if state.config.lr else 1.0
        self.optimizer.param_groups[0]["lr"] = self.lr * factor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def on_end(self, state: TrainState) -> None:
        if self.modules:
            self.finish(state.optimizer)

    def finish(self, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        """Fold g into B, keep the ``budget`` largest |g| (one per module at least); returns module -> rank."""
        scores = {}
        for name, _, a in self.modules:
            g = self.gates[name].detach().abs().float().cpu()  # (r,)
            g[g.argmax()] = float("inf")  # each module keeps its largest
            scores[name] = g
            parametrize.remove_parametrizations(a, "B", leave_parametrized=True)  # B ← B·diag(g), same Parameter
        keep = top_k(scores, self.budget)
        for name, wrapper, a in self.modules:
            idx = keep[name].nonzero().view(-1)
            if idx.numel() < a.config.r:
                self.prune(wrapper, name, idx, optimizer)
            self.ranks[name] = int(idx.numel())
        self.modules, self.optimizer = [], None
        return self.ranks
