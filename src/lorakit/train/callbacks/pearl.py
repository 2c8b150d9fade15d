"""pearl: PEARL, Parameter Efficient Continual Learning with Dynamic Low-Rank Adaptation —
https://arxiv.org/abs/2505.11998. Rule: after ``probe`` steps of task t, dₘ = ‖ΔWₘ − ΔWₘ^ref‖_F / ‖ΔWₘ^ref‖_F per
module (no reference, the first task: dₘ = ‖ΔWₘ‖_F / ‖W₀ₘ‖_F), and rₘ = r_min + (budget − n·r_min)·wₘ/Σw with
wₘ = dₘ − minⱼ dⱼ (rounded by largest remainder, capped at the attached rank, the cap's excess shared again): the
farther a module's update is from the reference task's, the more rank it keeps; the closest keeps r_min.

How it runs on a plain ``lora`` adapter attached at rank r (the most any module keeps): the first ``probe``
optimizer steps train at r; then (``after_optimizer_step`` of step ``probe``) the distances are measured from the
current ΔW = s·B·A and the reference adapter dir (``reference=``, read by :func:`lorakit.io.factors.read_factors`;
task t−1's adapter in :func:`lorakit.train.continual.continual`), the ranks set, and each module truncated to its
rank by SVD of its current B·A: A, B are first rotated to the SVD basis (B = U√S, A = √S·Vᵀ, the product
unchanged), then the trailing components are cut by ``prune`` (rank surgery, train/callbacks/_rank.py). That cut
drops components that contribute, so it is the best rank-rₘ approximation (Eckart–Young) and not output-neutral:
the relative change ‖ΔW − ΔW_rₘ‖_F/‖ΔW‖_F per module is measured and kept in ``truncation``. The Adam moments of
the rotated A and B restart at zero (they were in the old basis). The rest of the run trains at the new ranks;
the saved dir is an ordinary PEFT LoRA with a per-module ``rank_pattern``.

Simplified from the paper: it allocates per module within a total-rank budget (the paper sets one rank per task
component from thresholds on the distance, on vision backbones), and the reference is one earlier task's
adapter (the paper's reference task weights). Bad budgets, ``probe`` at or after the run's end, a missing or
mismatched reference, ``train_only`` adapters and non-LoRA adapters are ConfigErrors before the first step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.inject import AdaptedLayer
from lorakit.io.adapter import weight_norm
from lorakit.io.factors import read_factors
from lorakit.methods.lowrank.lora import Lora
from lorakit.train.callbacks._allocator import Layer, RankAllocator, check_ints
from lorakit.train.callbacks._api import TrainState, register_callback


def proportional(weights: list[float], total: int, low: int, high: list[int]) -> list[int]:
    """Integers xᵢ in [low, highᵢ] summing to ``total``, xᵢ − low ∝ weightsᵢ where no cap binds (water-filling,
    then largest remainder; ties to the earlier index). Needs n·low ≤ total ≤ Σ high."""
    n = len(weights)
    share = [float(low)] * n
    free, left = set(range(n)), float(total - n * low)
    while free and left > 1e-9:
        w = {i: max(weights[i], 0.0) for i in free}
        if sum(w.values()) <= 0:  # no distances: equal shares
            w = dict.fromkeys(free, 1.0)
        give = {i: left * w[i] / sum(w.values()) for i in free}
        capped = {i for i in free if share[i] + give[i] >= high[i]}
        if not capped:
            for i in free:
                share[i] += give[i]
            break
        for i in capped:
            left -= high[i] - share[i]
            share[i] = float(high[i])
        free -= capped
    out = [int(s + 1e-9) for s in share]
    order = sorted(range(n), key=lambda i: (-(share[i] - out[i]), -weights[i], i))
    for i in order:
        if sum(out) >= total:
            break
        if out[i] < high[i]:
            out[i] += 1
    return out


@register_callback(
    "pearl",
    help="PEARL: per-module 'lora' ranks set after a probe from the distance of the task's update to a reference "
    "adapter's (continual learning). Options: budget (total rank), probe (steps), reference (adapter dir), r_min, "
    "report (JSON path).",
)
class PearlAllocator(RankAllocator):
    name = "pearl"

    def __init__(
        self, budget: int, probe: int = 10, reference: str | None = None, r_min: int = 1, report: str | None = None
    ):
        """``budget``: the total rank this task's adapter keeps; ``probe``: steps trained at the attached rank
        before the distances are measured; ``reference``: an earlier task's adapter dir (None: the base weights
        are the reference, as for the first task); ``r_min``: the least rank a module keeps; ``report``: a JSON file
        written at the end with the distances, ranks and truncation changes."""
        super().__init__(budget)
        check_ints(self.name, probe=probe, r_min=r_min)
        if reference is not None and (not isinstance(reference, (str, Path)) or not str(reference).strip()):
            raise ConfigError(f"pearl: reference must be an adapter dir path or none, got {reference!r}.")
        self.probe, self.r_min = probe, r_min
        self.reference = None if reference is None else Path(str(reference))
        self.report = None if report is None else Path(str(report))
        self.ref_deltas: dict[str, torch.Tensor] = {}
        self.distances: dict[str, float] = {}  # module -> dₘ, measured at step ``probe``
        self.ranks: dict[str, int] = {}  # module -> rₘ
        self.truncation: dict[str, float] = {}  # module -> ‖ΔW − ΔW_rₘ‖_F / ‖ΔW‖_F of the cut

    def check_budget(self, layers: list[Layer], steps: int) -> None:
        for name, _, a in layers:
            if a.config.train_only is not None:
                raise ConfigError(
                    f"pearl: {name} has train_only={a.config.train_only!r}; the SVD truncation "
                    "rotates A, so attach plain 'lora' without train_only."
                )
        capacity, n = sum(self.caps(layers)), len(layers)
        if self.budget > capacity:
            raise ConfigError(
                f"pearl: budget={self.budget} exceeds the attached capacity (total rank {capacity} "
                f"over {n} modules); lower budget or attach a larger r."
            )
        if self.budget < n * self.r_min:
            raise ConfigError(f"pearl: budget={self.budget} is below r_min={self.r_min} for each of the {n} modules.")
        self.check_schedule(steps, probe=self.probe)
        if self.reference is not None:
            self.ref_deltas = self.read_reference(layers)

    @staticmethod
    def caps(layers: list[Layer]) -> list[int]:
        """The most rank each module can keep: its attached r, at most min(out, in)."""
        return [min(int(a.config.r), *a.B.shape[:1], a.A.shape[1]) for _, _, a in layers]

    def read_reference(self, layers: list[Layer]) -> dict[str, torch.Tensor]:
        """{module: reference ΔW (out, in), float32} from the reference dir, checked against the adapted modules."""
        path = self.reference
        assert path is not None
        if not path.is_dir():
            raise ConfigError(f"pearl: reference={str(path)!r} is not an adapter dir; give an earlier task's adapter.")
        try:
            ref = read_factors(path)
        except (AdapterFormatError, ConfigError, OSError) as e:
            raise ConfigError(f"pearl: reference={str(path)!r} cannot be read as a LoRA adapter: {e}") from None
        out = {}
        for name, _, a in layers:
            if name not in ref.factors:
                raise ConfigError(
                    f"pearl: the reference {str(path)!r} has no adapter on {name}; use a reference "
                    "trained on the same targets."
                )
            delta = ref.delta(name)
            if delta.shape != (a.B.shape[0], a.A.shape[1]):
                raise ConfigError(
                    f"pearl: the reference's {name} is {tuple(delta.shape)}, the model's "
                    f"{(a.B.shape[0], a.A.shape[1])}; use a reference for the same base."
                )
            out[name] = delta
        return out

    def after_optimizer_step(self, state: TrainState) -> None:
        if state.step == self.probe:
            self.allocate(self.layers(state.model), state.optimizer)

    def on_end(self, state: TrainState) -> None:
        if self.report is not None:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            keep = {"distances": self.distances, "ranks": self.ranks, "truncation": self.truncation}
            self.report.write_text(json.dumps(keep, indent=1) + "\n")

    @torch.no_grad()
    def distance(self, name: str, wrapper: AdaptedLayer, adapter: Lora) -> float:
        """dₘ = ‖ΔW − ΔW_ref‖_F / ‖ΔW_ref‖_F (no reference: ‖ΔW‖_F / ‖W₀‖_F)."""
        delta = adapter.scale * (adapter.B.float() @ adapter.A.float())  # (out, in)
        if not self.ref_deltas:
            return float(delta.norm()) / max(weight_norm(wrapper.base_layer), 1e-12)
        ref = self.ref_deltas[name].to(delta.device)  # (out, in)
        return float((delta - ref).norm()) / max(float(ref.norm()), 1e-12)

    def allocate(self, layers: list[Layer], optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Measure the distances, set the ranks (summing to ``budget``) and truncate every module to its rank."""
        self.distances = {name: self.distance(name, w, a) for name, w, a in layers}
        d = list(self.distances.values())
        ranks = proportional([x - min(d) for x in d], self.budget, self.r_min, self.caps(layers))
        self.ranks = dict(zip(self.distances, ranks, strict=True))
        for name, wrapper, a in layers:
            self.truncation[name] = truncate_to(self, wrapper, name, a, self.ranks[name], optimizer)
        return self.ranks


@torch.no_grad()
def truncate_to(
    allocator: RankAllocator, wrapper: AdaptedLayer, name: str, a: Lora, r: int, optimizer: torch.optim.Optimizer | None
) -> float:
    """Rotate ``a``'s A, B to the SVD basis of B·A (product unchanged), keep the top ``r`` components by
    ``allocator.prune``; returns the relative Frobenius change of ΔW (the dropped σ's share)."""
    B, A = a.B.float(), a.A.float()  # (out, r0), (r0, in)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(int(a.config.r), S.numel())
    S = S[:k]  # rank(B·A) ≤ r0: the rest is rounding noise
    root = S.sqrt()
    newB = torch.zeros_like(B)
    newA = torch.zeros_like(A)
    newB[:, :k] = U[:, :k] * root  # (out, k)
    newA[:k] = root[:, None] * Vh[:k]  # (k, in)
    a.B.copy_(newB.to(a.B.dtype))
    a.A.copy_(newA.to(a.A.dtype))
    if optimizer is not None:  # moments of the old basis mean nothing in the new one
        optimizer.state.pop(a.A, None)
        optimizer.state.pop(a.B, None)
    total = float(S.square().sum())
    dropped = float(S[r:].square().sum())
    if r < int(a.config.r):
        allocator.prune(wrapper, name, torch.arange(r), optimizer)
    return (dropped / total) ** 0.5 if total > 0 else 0.0
