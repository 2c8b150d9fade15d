"""sensitivity_lora: Sensitivity-LoRA: Low-Load Sensitivity-Based Fine-Tuning for Large Language Models
(https://arxiv.org/abs/2509.09119) for plain ``lora`` adapters. Rule: r_m ∝ c_m = (1−mix)·G_m/ΣG + mix·S_m/ΣS,
Σ r_m = budget, where for each adapted base weight W_m with Hessian diagonal h = diag(∂²L/∂W_m²):

- element sensitivity s = |h| ⊙ W² (the second-order Taylor term ½δwᵀHδw of removing a weight, up to ½; the
  Hessian diagonal estimated by Hutchinson's E[z ⊙ Hz], Rademacher z, ``samples`` draws: train/callbacks/_hessian.py);
- global sensitivity G_m = Σ s (the module's total curvature-weighted mass);
- local sensitivity S_m = 1 − (share of Σ s held by the top ``topk`` fraction of its entries): how spread the
  sensitivity is over the matrix — a matrix whose sensitivity sits in a few entries needs fewer directions.

The loss is the training loss of the batches the loop trains on in its first ``probe`` steps (a forward pre-hook
on the model captures them; during those steps a pre-hook on the output head turns the loop's fused head off so the
model's own forward, and the hook, run). After step ``probe`` every module gets its rank by largest remainders
(one each first, at most min(d_in, d_out), Σ exactly ``budget``) and rank surgery applies it: a shrinking module
keeps its components of largest ‖B[:, i]‖·‖A[i]‖ (the others are dropped, which changes the output), a growing one
gets zero-B components (output unchanged). The saved dir is an ordinary PEFT LoRA with a ``rank_pattern``.
The estimate differentiates the whole model twice (fused attention off): a probe step costs a few training steps.
Not built from the paper: its Effective-Rank local metric (only the Top-k one is), and the weighting ``mix`` of
global and local terms is this file's choice, not a value taken from the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lorakit import layers as L
from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_fraction, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback
from lorakit.train.callbacks._hessian import hutchinson_diagonal


def proportional_ranks(scores: Sequence[float], budget: int, caps: Sequence[int]) -> list[int]:
    """Integer ranks summing exactly to ``budget``: one each, then the rest split ∝ ``scores`` by largest remainders
    (ties: order), none above its cap (what a cap refuses goes to the others). Zero scores everywhere: equal split."""
    n = len(scores)
    if not n <= budget <= sum(caps):
        raise ConfigError(f"budget {budget} must be between {n} (one per module) and {sum(caps)} (their caps).")
    ranks = [1] * n
    while (left := budget - sum(ranks)) > 0:
        room = [i for i in range(n) if ranks[i] < caps[i]]
        weight = [max(float(scores[i]), 0.0) for i in room]
        total = sum(weight)
        quota = [left * (w / total if total > 0 else 1 / len(room)) for w in weight]
        add = [min(math.floor(q), caps[i] - ranks[i]) for q, i in zip(quota, room, strict=True)]
        if not any(add):  # every quota below one: the largest remainder gets one
            add[max(range(len(room)), key=lambda j: (quota[j], -j))] = 1
        for a, i in zip(add, room, strict=True):
            ranks[i] += a
    return ranks


def combined_scores(
    hdiag: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], topk: float, mix: float
) -> list[float]:
    """c_m = (1−mix)·G_m/ΣG + mix·S_m/ΣS from each module's Hessian diagonal and weight (both shaped like W)."""
    glob, spread = [], []
    for h, w in zip(hdiag, weights, strict=True):
        s = (h.abs() * w.detach().float() ** 2).reshape(-1)  # (n,) element sensitivities
        k = max(1, math.ceil(topk * s.numel()))
        total = float(s.sum())
        glob.append(total)
        spread.append(1.0 - float(s.topk(k).values.sum()) / total if total > 0 else 0.0)
    g, sp = sum(glob), sum(spread)
    return [
        (1 - mix) * (a / g if g > 0 else 0.0) + mix * (b / sp if sp > 0 else 0.0)
        for a, b in zip(glob, spread, strict=True)
    ]


def base_weights(layers: list[Layer]) -> list[torch.Tensor]:
    """The base weight W of each adapted layer (its layout: (out, in) for nn.Linear)."""
    return [cast(torch.Tensor, w.base_layer.weight) for _, w, _ in layers]


@register_callback(
    "sensitivity_lora",
    help="Sensitivity-LoRA: 'lora' ranks ∝ Hessian (Hutchinson) global + local sensitivity of each base weight, set "
    "once after `probe` steps. Options: budget (total rank), probe, samples, topk, mix, seed.",
)
class SensitivityLoraAllocator(RankAllocator):
    name = "sensitivity_lora"

    def __init__(
        self, budget: int, probe: int = 1, samples: int = 8, topk: float = 0.1, mix: float = 0.5, seed: int = 0
    ):
        """``budget``: total rank after the allocation; ``probe``: steps whose batches estimate the Hessian (the
        ranks change after step ``probe``); ``samples``: Rademacher draws per batch; ``topk``: the fraction of
        entries of the local metric; ``mix``: the local metric's weight; ``seed``: of the draws."""
        super().__init__(budget)
        check_ints(self.name, probe=probe, samples=samples)
        check_ints(self.name, low=0, seed=seed)
        check_fraction(self.name, topk=topk, mix=mix)
        if topk == 0:
            raise ConfigError(f"{self.name}: topk must be in (0, 1], got 0.")
        self.probe, self.samples, self.topk, self.mix, self.seed = probe, samples, topk, mix, seed
        self.hdiag: dict[str, torch.Tensor] = {}  # module -> mean Hessian-diagonal estimate, shaped like W
        self.batches: list[dict[str, Any]] = []
        self.hooks: list[Any] = []
        self.capturing = True
        self.scores: dict[str, float] = {}
        self.ranks: dict[str, int] = {}

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        super().check_budget(layers, steps)
        self.check_schedule(steps, probe=self.probe)
        for name, wrapper, _ in layers:
            if not cast(torch.Tensor, wrapper.base_layer.weight).is_floating_point():
                raise ConfigError(f"{self.name}: {name} has a quantized base weight; its Hessian needs a float one.")

    def on_step_begin(self, state: TrainState) -> None:
        super().on_step_begin(state)
        self.batches = []
        if state.step < self.probe and not self.hooks:
            capture = state.model.register_forward_pre_hook(self._capture, with_kwargs=True)
            self.hooks = [capture]
            get_head: Any = getattr(state.model, "get_output_embeddings", None)
            head = get_head() if callable(get_head) else None
            if isinstance(head, nn.Module):  # any hook on the head makes the loop call model(**batch), unfused
                self.hooks.append(head.register_forward_pre_hook(lambda module, args: None))

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.capturing:  # the loop's training forwards, not the estimate's own
            self.batches.append(dict(kwargs))

    def after_backward(self, state: TrainState) -> None:
        if state.step >= self.probe:
            return
        layers, batches, self.batches = self.layers(state.model), self.batches, []
        if not batches:
            raise ConfigError(f"{self.name}: no batch reached model(**batch); the model's forward is not called.")
        for i, batch in enumerate(batches):
            est = self.estimate(state.model, layers, batch, seed=self.draw_seed(state.step, i))
            for name, h in est.items():
                self.hdiag[name] = self.hdiag.get(name, torch.zeros_like(h)) + h / (len(batches) * self.probe)

    def draw_seed(self, step: int, micro: int) -> int:
        """The Rademacher draws' seed for micro-batch ``micro`` of step ``step``."""
        return self.seed * 1_000_003 + step * 1009 + micro

    def estimate(
        self, model: nn.Module, layers: list[Layer], batch: dict[str, Any], seed: int
    ) -> dict[str, torch.Tensor]:
        """Hutchinson's diag(∂²L/∂W²) of each adapted base weight W on ``batch`` (L = model(**batch).loss)."""
        weights = base_weights(layers)
        flags = [w.requires_grad for w in weights]
        gen = torch.Generator().manual_seed(seed)
        self.capturing = False
        try:
            for w in weights:
                w.requires_grad_(True)  # the fused LoRA path needs a frozen W, so the plain (twice-differentiable) runs
            with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
                diag = hutchinson_diagonal(lambda: model(**batch).loss, weights, self.samples, gen)
        finally:
            for w, flag in zip(weights, flags, strict=True):
                w.requires_grad_(flag)
            self.capturing = True
        return {name: d for (name, _, _), d in zip(layers, diag, strict=True)}

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.probe:
            for hook in self.hooks:
                hook.remove()
            self.hooks = []
            self.allocate(self.layers(state.model), state.optimizer)

    def allocate(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Set every module's rank from the estimated sensitivities (rank surgery); returns module -> rank."""
        weights = base_weights(layers)
        scores = combined_scores([self.hdiag[n] for n, _, _ in layers], weights, self.topk, self.mix)
        caps = [min(L.dims(w.base_layer)) for _, w, _ in layers]
        ranks = proportional_ranks(scores, self.budget, caps)
        for (name, wrapper, a), r in zip(layers, ranks, strict=True):
            if r < a.config.r:  # keep the components of largest contribution ‖B[:, i]‖·‖A[i]‖
                norm = a.B.detach().float().norm(dim=0) * a.A.detach().float().norm(dim=1)  # (r,)
                keep = torch.sort(norm, descending=True, stable=True).indices[:r].sort().values
                self.prune(wrapper, name, keep, optimizer)
            elif r > a.config.r:
                self.grow(wrapper, name, r - int(a.config.r), optimizer)
        self.scores = {n: s for (n, _, _), s in zip(layers, scores, strict=True)}
        self.ranks = {n: r for (n, _, _), r in zip(layers, ranks, strict=True)}
        return self.ranks
