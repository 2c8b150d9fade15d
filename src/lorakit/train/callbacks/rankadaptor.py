"""rankadaptor: RankAdaptor, Hierarchical Rank Allocation for Efficient Fine-Tuning Pruned LLMs via Performance
Model — https://arxiv.org/abs/2406.15734. Rule: sample per-layer rank configs c = (r₁..r_L) from ``candidates``,
score each, fit a performance model P(c) ≈ score on those samples, apply argmax_c P(c) over the configs with
Σ_l n_l·r_l = budget and trainable params ≤ standard (uniform) LoRA's at the same total rank.

For a structurally pruned model the layers differ in width, so one uniform rank fits them unevenly; here every
adapted module of decoder layer l (``...layers.<l>.``; a module outside numbered layers is its own group) gets
the layer's rank r_l, as in the paper. How it runs on a plain ``lora`` adapter whose B is still zero (LoRA's
init): during the first ``probe`` steps the adapter is held still (its gradients dropped, so B stays 0) while
forward hooks on the adapted layers sum each module's weight gradient Gₘ = Σ δₘᵀ·xₘ = ∂L/∂Wₘ (out, in) over the
probe batches. The score of a config is a training-free proxy — the first-order loss reduction of a rank-rₘ
update, the gradient energy on Gₘ's top-rₘ singular directions: score(c) = Σₘ Σ_{i≤r_l(m)} σᵢ(Gₘ)². ``trials``
sampled configs are scored; the performance model is linear least squares (``torch.linalg.lstsq``) over one-hot
(layer, candidate) features, fitted on them (``fit_r2``); the config it predicts best among all feasible ones
(every one when there are few, else a large sample) is applied by rank surgery — ``prune``/``grow`` of components
that contribute nothing (B = 0), so the output is unchanged — and training proper runs at those ranks. The saved
dir is an ordinary PEFT LoRA with a per-module ``rank_pattern``.

Simplified from the paper: its performance model is a regressor meta-learned offline from configs fine-tuned and
evaluated for real, refined online; here the samples are scored by the gradient-energy proxy above (so the
linear model fits them almost exactly, and it adds the search over unsampled configs, not a better estimate).
Structural pruning itself is not part of lorakit. Bad budgets (no config of ``candidates`` makes them, or none
fits the parameter bound), ``probe`` at or after the run's end, a nonzero B, embedding targets and non-LoRA
adapters are ConfigErrors before the first step.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import torch

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback

POOL = 20000  # the most feasible configs searched (enumerated when fewer, else sampled)


def layer_groups(names: list[str]) -> dict[str, list[str]]:
    """{group: modules}: the modules of decoder layer l share group ``layers.<l>``; others are their own group."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.search(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.", name)
        groups.setdefault(f"layers.{match.group(1)}" if match else name, []).append(name)
    return groups


@register_callback(
    "rankadaptor",
    help="RankAdaptor: per-layer 'lora' ranks for a structurally pruned model, chosen by a performance model over "
    "sampled configs scored by gradient energy. Options: budget (total rank), candidates (e.g. 1|2|4), trials, "
    "probe (steps), seed.",
)
class RankAdaptorAllocator(RankAllocator):
    name = "rankadaptor"

    def __init__(self, budget: int, candidates: Any = "1|2|4|8", trials: int = 32, probe: int = 1, seed: int = 0):
        """``budget``: total rank over all adapted modules (Σ_l n_l·r_l, exactly); ``candidates``: the ranks a
        layer may take, ``|``-separated; ``trials``: configs sampled and scored to fit the performance model;
        ``probe``: steps whose gradients are summed (the adapter is held still during them)."""
        super().__init__(budget)
        check_ints(self.name, trials=trials, probe=probe)
        check_ints(self.name, low=0, seed=seed)
        try:
            values = sorted({int(v) for v in str(candidates).split("|")})
        except ValueError:
            values = []
        if not values or values[0] < 1:
            raise ConfigError(f"rankadaptor: candidates must be positive integers joined by '|', got {candidates!r}.")
        self.candidates, self.trials, self.probe, self.seed = values, trials, probe, seed
        self.groups: dict[str, list[str]] = {}
        self.pool: list[tuple[int, ...]] = []  # the feasible configs (a rank per group)
        self.grads: dict[str, torch.Tensor] = {}  # module -> Gₘ (out, in)
        self.hooks: list[Any] = []
        self.samples: list[tuple[tuple[int, ...], float]] = []  # (config, proxy score) the model was fitted on
        self.fit_r2 = float("nan")
        self.chosen: dict[str, int] = {}  # group -> rank
        self.costs: list[int] = []  # per group: params per unit of rank, Σₘ (outₘ + inₘ)
        self.limit = 0.0  # uniform LoRA's trainable params at the same total rank

    # -- the check before the first step: groups, the feasible configs ----------------------------------------
    def check_budget(self, layers: list[Layer], steps: int) -> None:
        self.check_schedule(steps, probe=self.probe)
        for name, _, a in layers:
            if a.kind == "embedding":
                raise ConfigError(f"rankadaptor: {name} is an embedding; target linear layers only.")
            if a.B.detach().abs().max() > 0:
                raise ConfigError(
                    f"rankadaptor: {name}'s B is not zero; the ranks are set before training, on a "
                    "freshly attached adapter (init='default')."
                )
        self.groups = layer_groups([name for name, _, _ in layers])
        sizes = {name: (a.B.shape[0], a.A.shape[1]) for name, _, a in layers}  # (out, in)
        if (top := self.candidates[-1]) > (low := min(min(s) for s in sizes.values())):
            raise ConfigError(f"rankadaptor: candidate rank {top} exceeds the narrowest adapted layer ({low}).")
        self.costs = [sum(sum(sizes[m]) for m in ms) for ms in self.groups.values()]  # params per unit of rank
        self.limit = self.budget / len(layers) * sum(self.costs)  # uniform LoRA's params at the same total rank
        self.pool = self.feasible()
        if not self.pool:
            raise ConfigError(
                f"rankadaptor: no per-layer ranks from {self.candidates} over groups of "
                f"{[len(m) for m in self.groups.values()]} modules make total rank {self.budget} within uniform "
                "LoRA's parameter count; change budget or candidates."
            )

    def feasible(self) -> list[tuple[int, ...]]:
        """Configs with Σ n_l·r_l = budget and params ≤ ``limit``: all of them when few, else a seeded sample."""
        n = [len(m) for m in self.groups.values()]

        def ok(c: tuple[int, ...]) -> bool:
            return sum(k * r for k, r in zip(n, c, strict=True)) == self.budget and self.params(c) <= self.limit + 1e-6

        if len(self.candidates) ** len(n) <= POOL:
            return [c for c in itertools.product(self.candidates, repeat=len(n)) if ok(c)]
        reach = [{0}]  # reach[i]: totals the last i groups can make
        for k in reversed(n):
            reach.append({t + k * r for t in reach[-1] for r in self.candidates})
        reach.reverse()
        rng, found = random.Random(self.seed), set()
        for _ in range(POOL):
            left, c = self.budget, []
            for i, k in enumerate(n):
                options = [r for r in self.candidates if left - k * r in reach[i + 1]]
                if not options:
                    break
                c.append(rng.choice(options))
                left -= k * c[-1]
            if len(c) == len(n) and ok(tuple(c)):
                found.add(tuple(c))
        return sorted(found)

    def params(self, config: tuple[int, ...]) -> int:
        return sum(r * cost for r, cost in zip(config, self.costs, strict=True))

    # -- the probe steps: gradients of the adapted weights -------------------------------------------------------
    def on_step_begin(self, state: TrainState) -> None:
        super().on_step_begin(state)
        if state.step == 0:
            for name, wrapper, _ in self.layers(state.model):
                self.hooks.append(wrapper.register_forward_hook(self.capture(name)))

    def capture(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def grad(g: torch.Tensor) -> None:
                G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
                self.grads[name] = self.grads.get(name, 0) + G

            output.register_hook(grad)

        return hook

    def after_backward(self, state: TrainState) -> None:
        if state.step >= self.probe:
            return
        layers = self.layers(state.model)
        for _, _, a in layers:  # the adapter is held still: B stays 0
            for p in a.parameters():
                p.grad = None
        if state.step == self.probe - 1:
            for h in self.hooks:
                h.remove()
            self.allocate(layers, state.optimizer)

    # -- proxy scores, performance model, the applied config -----------------------------------------------------
    def energies(self) -> dict[str, torch.Tensor]:
        """Module -> cumulative σᵢ(Gₘ)² over i (index r−1: the energy a rank-r update captures)."""
        top = self.candidates[-1]
        zero = torch.zeros(top)
        return {
            m: torch.linalg.svdvals(self.grads[m])[:top].square().cumsum(0).cpu() if m in self.grads else zero
            for ms in self.groups.values()
            for m in ms
        }

    def proxy(self, config: tuple[int, ...], energy: dict[str, torch.Tensor]) -> float:
        return sum(float(energy[m][r - 1]) for r, ms in zip(config, self.groups.values(), strict=True) for m in ms)

    def features(self, configs: list[tuple[int, ...]]) -> torch.Tensor:
        """One-hot (group, candidate) rows, (len(configs), groups·candidates), float64."""
        index = {r: i for i, r in enumerate(self.candidates)}
        X = torch.zeros(len(configs), len(self.groups) * len(self.candidates), dtype=torch.float64)
        for row, c in enumerate(configs):
            for g, r in enumerate(c):
                X[row, g * len(self.candidates) + index[r]] = 1.0
        return X

    def allocate(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Score ``trials`` sampled configs, fit the model, apply its best feasible config; returns group -> rank."""
        energy = self.energies()
        sampled = random.Random(self.seed).sample(self.pool, min(self.trials, len(self.pool)))
        self.samples = [(c, self.proxy(c, energy)) for c in sampled]
        X, y = self.features(sampled), torch.tensor([s for _, s in self.samples], dtype=torch.float64)
        w = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution  # (features, 1)
        residual = float((X @ w - y[:, None]).square().sum())
        spread = float((y - y.mean()).square().sum())
        self.fit_r2 = 1.0 - residual / spread if spread > 0 else 1.0
        predicted = (self.features(self.pool) @ w).squeeze(1)  # (pool,)
        best = self.pool[int(torch.argmax(predicted))]
        self.chosen = dict(zip(self.groups, best, strict=True))
        rank_of = {m: r for r, ms in zip(best, self.groups.values(), strict=True) for m in ms}
        for name, wrapper, a in layers:  # B = 0: cutting or adding components leaves the output unchanged
            r, now = rank_of[name], int(a.config.r)
            if r < now:
                self.prune(wrapper, name, torch.arange(r), optimizer)
            elif r > now:
                self.grow(wrapper, name, r - now, optimizer)
        return self.chosen
