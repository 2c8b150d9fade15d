"""prilora: PRILoRA — Pruned and Rank-Increasing Low-Rank Adaptation (https://arxiv.org/abs/2401.11316), on plain
``lora`` adapters. Rule: r_l = r_min + ⌊(r_max − r_min)·(l − l₀)/(l₁ − l₀) + ½⌋ for block index l in [l₀, l₁];
every ``every`` steps each row of A zeroes the lowest S_ij = |A_ij|·n̄_j among its unpruned entries, n̄ the EMA
of the input's per-feature norms n_j = ‖x_{:,j}‖₂ over a batch's tokens.

- Linear rank distribution: at the first step every adapted module of transformer block l (its name's first
  numeric part) is set to r_l by rank surgery — components grown with zero B columns, or the last components
  removed, which must have zero B columns (the default init), so the outputs are unchanged. ``budget`` must be the
  total those ranks give (a clear error names it otherwise).
- Ongoing importance-based A pruning: forward hooks on the wrapped layers keep n̄ (n̄ ← β·n̄ + (1 − β)·n, the first
  batch's n to start). At each pruning step k = every, 2·every, … a row with z_{k−1} zeros gets
  z_k = z_{k−1} + ⌊fraction·(in − z_{k−1})⌋ zeros (``fraction`` of what is still unpruned, so sparsity
  ≈ 1 − (1 − fraction)^k): the new zeros are its lowest-S unpruned entries. Pruned entries stay zero: their
  gradient is zeroed in ``after_backward`` and they are re-zeroed after every optimizer step (momentum, decay).

The saved dir is an ordinary PEFT LoRA (per-module ``rank_pattern``; the pruned entries of A are zeros). The
schedule above is this library's reading of the paper (its per-row pruning of A by |A|·‖x‖ with the input statistics
accumulated); the paper's own hyper-parameters (pruning ratio and interval per task) are not reproduced.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_fraction, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback


def block_index(module: str) -> int | None:
    """The first numeric part of a module name (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(found.group(1)) if found else None


def linear_ranks(indices: dict[str, int], r_min: int, r_max: int) -> dict[str, int]:
    """Module -> r_min + ⌊(r_max − r_min)·(l − l₀)/(l₁ − l₀) + ½⌋ of its block index l (one block: r_max)."""
    lo, hi = min(indices.values()), max(indices.values())
    if lo == hi:
        return dict.fromkeys(indices, r_max)
    return {m: r_min + math.floor((r_max - r_min) * (i - lo) / (hi - lo) + 0.5) for m, i in indices.items()}


def pruned_per_row(k: int, features: int, fraction: float) -> int:
    """z_k: zeros in each row of A after k pruning steps (z₀ = 0, z_k = z_{k−1} + ⌊fraction·(in − z_{k−1})⌋)."""
    z = 0
    for _ in range(k):
        z += math.floor(fraction * (features - z))
    return z


@register_callback(
    "prilora",
    help="PRILoRA: 'lora' ranks grow linearly with layer index from r_min to r_max (budget = their total), and A is "
    "pruned every `every` steps by |A|·‖x‖. Options: budget, r_min, r_max, every, fraction, beta.",
)
class PriLoraAllocator(RankAllocator):
    name = "prilora"

    def __init__(
        self, budget: int, r_min: int = 4, r_max: int = 12, every: int = 50, fraction: float = 0.1, beta: float = 0.9
    ):
        """``budget``: the total of the linear ranks (checked); ``r_min`` / ``r_max``: ranks of the first / last
        adapted block; ``every``: steps between pruning steps; ``fraction``: share of each A row's unpruned entries
        zeroed at each; ``beta``: EMA factor of the input norms."""
        super().__init__(budget)
        check_ints(self.name, r_min=r_min, r_max=r_max, every=every)
        check_fraction(self.name, fraction=fraction, beta=beta)
        if fraction == 0:
            raise ConfigError("prilora: fraction=0 would never prune; give a number in (0, 1].")
        if r_max < r_min:
            raise ConfigError(f"prilora: r_max={r_max} is below r_min={r_min}; ranks grow with the layer index.")
        self.r_min, self.r_max, self.every, self.fraction, self.beta = r_min, r_max, every, float(fraction), beta
        self.targets: dict[str, int] = {}  # module -> its linear rank
        self.norms: dict[str, torch.Tensor] = {}  # module -> n̄ (in,)
        self.masks: dict[str, torch.Tensor] = {}  # module -> pruned entries of A (bool, (r, in))
        self.pruned = 0  # pruning steps done
        self.history: list[tuple[int, dict[str, int]]] = []  # (step, module -> zero entries of A after pruning)
        self.hooks: list[Any] = []

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        indices = {}
        for name, _, a in layers:
            index = block_index(name)
            if index is None or a.kind == "embedding":
                raise ConfigError(
                    f"prilora: {name} is not in a numbered transformer block (or is an embedding), so it has no layer "
                    "index for the linear ranks; target the blocks' linear layers only."
                )
            indices[name] = index
        self.targets = linear_ranks(indices, self.r_min, self.r_max)
        total = sum(self.targets.values())
        if total != self.budget:
            raise ConfigError(
                f"prilora: r_min={self.r_min} to r_max={self.r_max} over these {len(layers)} modules give total rank "
                f"{total}, not budget={self.budget}; set budget={total} or change r_min/r_max."
            )
        for name, _, a in layers:
            dropped = a.B[:, self.targets[name] :]  # (out, r − r_l) when the attached r is larger
            if dropped.numel() and bool(dropped.ne(0).any()):
                raise ConfigError(
                    f"prilora: {name} must drop to rank {self.targets[name]} but its components past it already "
                    f"contribute (nonzero B); attach r <= {self.targets[name]} there or use the default (zero B) init."
                )
        self.check_schedule(steps, every=self.every)

    def on_step_begin(self, state: TrainState) -> None:
        if not self.checked:
            super().on_step_begin(state)
            self.set_ranks(self.layers(state.model), state.optimizer)

    def set_ranks(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None) -> None:
        """Each module to its linear rank (outputs unchanged) and the input-norm hooks on."""
        for name, wrapper, a in layers:
            r, target = int(a.config.r), self.targets[name]
            if target > r:
                self.grow(wrapper, name, target - r, optimizer)
            elif target < r:
                self.prune(wrapper, name, torch.arange(target), optimizer)
            self.hooks.append(wrapper.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        @torch.no_grad()
        def hook(wrapper: nn.Module, args: tuple[Any, ...], _: Any) -> None:
            x = args[0].float()
            n = x.reshape(-1, x.shape[-1]).norm(dim=0)  # (in,): ‖x_{:,j}‖₂ over the batch's tokens
            old = self.norms.get(name)
            self.norms[name] = n if old is None else self.beta * old + (1 - self.beta) * n

        return hook

    def after_backward(self, state: TrainState) -> None:
        for name, _, a in self.layers(state.model):
            if name in self.masks and a.A.grad is not None:
                a.A.grad.masked_fill_(self.masks[name], 0.0)

    def after_optimizer_step(self, state: TrainState) -> None:
        layers = self.layers(state.model)
        if state.step % self.every == 0:
            self.prune_entries(layers, state.step)
        self.apply(layers)

    @torch.no_grad()
    def prune_entries(self, layers: list[Layer], step: int) -> None:
        """One pruning step: every row of A to z_k zeros, the new ones its lowest |A|·n̄ among the unpruned."""
        self.pruned += 1
        counts = {}
        for name, _, a in layers:
            if name not in self.norms:
                raise RuntimeError(f"prilora: no input was seen by {name} before pruning (no forward through it).")
            score = a.A.abs().float() * self.norms[name].to(a.A.device)  # (r, in)
            old = self.masks.get(name, torch.zeros_like(score, dtype=torch.bool))
            score = score.masked_fill(old, -math.inf)  # (r, in): pruned entries stay pruned
            z = pruned_per_row(self.pruned, a.A.shape[1], self.fraction)
            mask = torch.zeros_like(old)
            mask.scatter_(1, score.argsort(dim=1, stable=True)[:, :z], True)  # (r, in)
            self.masks[name] = mask
            a.A.masked_fill_(mask, 0.0)
            counts[name] = int(a.A.eq(0).sum())
        self.history.append((step, counts))

    @torch.no_grad()
    def apply(self, layers: list[Layer]) -> None:
        for name, _, a in layers:
            if name in self.masks:
                a.A.masked_fill_(self.masks[name], 0.0)

    def on_end(self, state: TrainState) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
