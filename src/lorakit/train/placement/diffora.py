"""DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation —
https://arxiv.org/abs/2502.08905
Update rule: h_m = W_m x + σ(γ_m)·B_m A_m x on every candidate module m (DAM relaxed to σ(γ) ∈ (0, 1));
A, B step on train batches, γ on held batches (first-order bi-level); targets = top-k of σ(γ).

DiffoRA's Differential Adaptation Matrix (DAM) is a binary matrix over (layer, module) saying which modules
carry a LoRA. Its continuous relaxation gives every candidate module a gate in (0, 1) on its LoRA's output; the
gates are learned by gradient descent together with the LoRAs, then discretised: the modules with the largest
gates keep their adapter. As in the paper's bi-level problem (DARTS-style), the LoRA weights minimise the loss on
training batches and the gates the loss on other (held) batches; here with the first-order approximation, one
LoRA step then one gate step per round, on alternating batches (batches 0, 2, 4, ... train the LoRAs, 1, 3, 5,
... the gates; a single batch serves both).

Here: the search runs on a deep copy of the model (the caller's model, its weights, modes and hooks are left
as they were); the candidates are what ``all-linear`` selects (less ``exclude``); each gets a rank-``r`` LoRA
(A Kaiming-uniform as LoRA's default, B zero, scale 1) and a gate logit γ = 0 (σ = ½) through a forward hook.
AdamW steps the LoRAs (``lr``), plain SGD the gates (``gate_lr``): Adam's per-gate normalisation would move every
gate by about the same step in a short search, erasing the gradient magnitudes that rank them; after a short
search the gates are still near ½, their order is what counts. ``steps`` rounds run under ``seed`` (the same
seed and batches give the same targets; the global RNG is restored after). ``per=module`` returns the top-``k``
module names (full names: ``lk.attach`` takes them as a target list), ``per=type`` the top-``k`` module types by
their mean gate. Differences from the paper: the relaxation is a sigmoid gate per module and the discretisation a
global top-k (the paper's own parametrisation and per-layer selection ratio may differ); its weight-sharing
optimisation is not built: the search LoRAs are discarded and training attaches fresh adapters to the choice.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.inject import logical_modules
from lorakit.train.placement._api import Batch, Placement, candidates, forward_batch, module_type, register_placement


class GatedLora(nn.Module):
    """One candidate's relaxed DAM entry: ``out + σ(γ)·(x Aᵀ Bᵀ)``."""

    def __init__(self, d_in: int, d_out: int, r: int, gen: torch.Generator):
        super().__init__()
        bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on (r, d_in), LoRA's default A
        self.A = nn.Parameter((torch.rand(r, d_in, generator=gen) * 2 - 1) * bound)  # (r, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, r))  # (d_out, r)
        self.gate = nn.Parameter(torch.zeros(()))  # γ: σ(γ) = ½ at the start

    def hook(self, _layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (..., d_in)
        delta = (x.to(self.A.dtype) @ self.A.T) @ self.B.T  # (..., d_out)
        return out + (torch.sigmoid(self.gate) * delta).to(out.dtype)


def _shapes(model: nn.Module, names: list[str], batch: Batch) -> dict[str, tuple[int, int]]:
    """{name: (d_in, d_out)} of each module, read off one forward."""
    layers, found = dict(logical_modules(model)), {}

    def record(name: str) -> Any:
        def run(_layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            found[name] = (int(args[0].shape[-1]), int(out.shape[-1]))

        return run

    handles = [layers[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            forward_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return found


def gate_values(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    steps: int,
    r: int,
    lr: float,
    gate_lr: float,
    seed: int = 0,
    exclude: Sequence[str] | None = None,
) -> dict[str, float]:
    """{candidate module name: σ(γ)} after ``steps`` rounds of the relaxed search on a copy of ``model``."""
    names = candidates(model, exclude)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        search = copy.deepcopy(model).eval()  # the caller's model is never touched
        search.requires_grad_(False)
        device = next(search.parameters()).device
        shapes = _shapes(search, names, batches[0])
        gen = torch.Generator().manual_seed(seed)
        gated = {n: GatedLora(*shapes[n], r, gen).to(device) for n in names}
        layers = dict(logical_modules(search))
        handles = [layers[n].register_forward_hook(gated[n].hook) for n in names]
        lora = [p for g in gated.values() for p in (g.A, g.B)]
        opt_lora = torch.optim.AdamW(lora, lr=lr, weight_decay=0.0)
        opt_gate = torch.optim.SGD([g.gate for g in gated.values()], lr=gate_lr)  # steps ∝ ∂L/∂γ: magnitudes rank
        train, held = batches[0::2], (batches[1::2] or batches[0::2])
        try:
            for step in range(steps):
                for opt, batch in ((opt_lora, train[step % len(train)]), (opt_gate, held[step % len(held)])):
                    loss = forward_batch(search, batch).loss
                    if not torch.isfinite(loss):
                        raise ConfigError(f"placement diffora: the search loss is {float(loss)} at round {step}.")
                    opt_lora.zero_grad(set_to_none=True)
                    opt_gate.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            for handle in handles:
                handle.remove()
    return {n: float(torch.sigmoid(gated[n].gate.detach())) for n in names}


@register_placement(
    "diffora",
    help="DiffoRA: gate a LoRA on every candidate module, learn the gates (relaxed DAM) for a few steps on a copy, "
    "keep the top k. Options: k (default: half), per (module or type), steps (10), r (4), lr (1e-3), gate_lr (1.0).",
)
class DiffoRA(Placement):
    name = "diffora"

    def __init__(
        self,
        k: int | None = None,
        per: str = "module",
        steps: int = 10,
        r: int = 4,
        lr: float = 1e-3,
        gate_lr: float = 1.0,
    ):
        """``k``: modules (``per=module``) or module types (``per=type``) to keep, default half of them;
        ``steps``: search rounds (one LoRA and one gate step each); ``r``: rank of the search LoRAs."""
        for key, value in (("steps", steps), ("r", r)) + ((("k", k),) if k is not None else ()):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"placement diffora: {key} must be a positive integer, got {value!r}.")
        for key, rate in (("lr", lr), ("gate_lr", gate_lr)):
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
                raise ConfigError(f"placement diffora: {key} must be a positive number, got {rate!r}.")
        if per not in ("module", "type"):
            raise ConfigError(f"placement diffora: per must be 'module' or 'type', got {per!r}.")
        self.k, self.per, self.steps, self.r, self.lr, self.gate_lr = k, per, steps, r, float(lr), float(gate_lr)
        self.gates: dict[str, float] = {}
        """The last :meth:`choose`'s σ(γ) per module."""
        self.scores: dict[str, float] = {}
        """The last :meth:`choose`'s ranked scores: σ(γ) per module, or the mean σ(γ) per module type."""

    def choose(
        self, model: nn.Module, batches: Sequence[Batch], *, seed: int = 0, exclude: Sequence[str] | None = None
    ) -> list[str]:
        self.gates = gate_values(
            model, batches, steps=self.steps, r=self.r, lr=self.lr, gate_lr=self.gate_lr, seed=seed, exclude=exclude
        )
        if self.per == "module":
            self.scores = dict(self.gates)
        else:
            kinds: dict[str, list[float]] = {}
            for name, value in self.gates.items():
                kinds.setdefault(module_type(name), []).append(value)
            self.scores = {kind: sum(values) / len(values) for kind, values in kinds.items()}
        k = self.k if self.k is not None else math.ceil(len(self.scores) / 2)
        if k > len(self.scores):
            raise ConfigError(
                f"placement diffora: k={k} but there are only {len(self.scores)} candidate {self.per}s to keep."
            )
        order = list(self.scores)  # model order: ties keep the earlier module
        top = sorted(order, key=lambda n: (-self.scores[n], order.index(n)))[:k]
        return [n for n in order if n in top]  # in model order
