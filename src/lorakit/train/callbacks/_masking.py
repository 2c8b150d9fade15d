"""Masked rank components, shared by the elalora, dora_dynamic and alora_alloc allocators on ``lora`` adapters.

A component i of a LoRA adapter is its rank-1 term s·B[:, i]·A[i, :]. Masking it zeroes its B column, so it
contributes nothing (the gate c_i = 0 of DoRA / ALoRA, Λ_i = 0 of ElaLoRA's SVD form); a mask is held through
training by zeroing the column again after every optimizer step (:func:`apply_masks`); masked components are
then removed by rank surgery (:func:`remove_masked`, ``RankAllocator.prune``), which leaves the outputs unchanged
because they contribute nothing. Moving rank (ElaLoRA, ALoRA) is: mask the k lowest-scoring components over all
modules (:func:`lowest`, never a module's last one), remove them, and grow the top modules by one component each
(:func:`grow_top`, ``RankAllocator.grow``: a zero B column, so again the outputs are unchanged).

Masks are ``{module: (r,) bool}``, True where a component is active.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from lorakit.errors import ConfigError
from lorakit.train.callbacks._allocator import Layer, RankAllocator

Masks = dict[str, torch.Tensor]


def all_active(layers: list[Layer]) -> Masks:
    """A mask per module with every component active."""
    return {name: torch.ones(int(a.config.r), dtype=torch.bool) for name, _, a in layers}


def active_total(masks: Masks) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


@torch.no_grad()
def apply_masks(layers: list[Layer], masks: Masks) -> None:
    """B[:, i] := 0 for every masked component i (its term s·B[:, i]·A[i, :] is then 0)."""
    for name, _, a in layers:
        off = ~masks[name].to(a.B.device)  # (r,)
        if off.any():
            a.B[:, off] = 0.0  # (out, r)


def remove_masked(
    allocator: RankAllocator, layers: list[Layer], masks: Masks, optimizer: torch.optim.Optimizer | None
) -> None:
    """Rank surgery: every module keeps its active components only (masks become all-active at the new ranks)."""
    for name, wrapper, a in layers:
        keep = masks[name].nonzero().view(-1)  # (r',)
        if keep.numel() == 0:
            raise ConfigError(f"{allocator.name}: every component of {name} is masked; a module keeps one at least.")
        if keep.numel() < int(a.config.r):
            allocator.prune(wrapper, name, keep, optimizer)
        masks[name] = torch.ones(keep.numel(), dtype=torch.bool)


def lowest(scores: Mapping[str, torch.Tensor], k: int, protected: Mapping[str, int] | None = None) -> Masks:
    """Masks without the ``k`` lowest-scoring components over all modules (ascending, ties in module order),
    never a module's last one and never one of its last ``protected[module]`` (just grown) components; fewer
    than ``k`` when no other component may go."""
    protected = protected or {}
    masks = {name: torch.ones(s.numel(), dtype=torch.bool) for name, s in scores.items()}
    names = list(scores)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores.values())])  # (R,)
    index = torch.cat([torch.arange(s.numel()) for s in scores.values()])  # (R,)
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores.values()])  # (R,)
    left = {name: s.numel() for name, s in scores.items()}
    taken = 0
    for j in torch.sort(flat, stable=True).indices.tolist():
        if taken == k:
            break
        name, i = names[int(owner[j])], int(index[j])
        if left[name] > 1 and i < scores[name].numel() - protected.get(name, 0):
            masks[name][i] = False
            left[name] -= 1
            taken += 1
    return masks


def keep_top(scores: Mapping[str, torch.Tensor], masks: Masks, budget: int) -> Masks:
    """Masks keeping exactly ``budget`` of the active components: each module's best active one, then the
    highest scores over all modules; a masked component stays masked (``budget`` ≤ the active total)."""
    ranked = {}
    for name, s in scores.items():
        s = s.float().cpu().clone()
        s[~masks[name]] = -torch.inf
        ranked[name] = s
    flat = torch.cat(list(ranked.values()))  # (R,)
    bonus = flat.abs()[flat.isfinite()].max().item() + 1 if flat.isfinite().any() else 1.0
    for s in ranked.values():
        s[int(s.argmax())] += bonus  # the module's best: above every other finite score
    kept, start = torch.zeros(flat.numel(), dtype=torch.bool), 0
    order = torch.sort(torch.cat(list(ranked.values())), descending=True, stable=True).indices
    kept[order[:budget]] = True
    out = {}
    for name, s in ranked.items():
        out[name] = kept[start : start + s.numel()] & masks[name]
        start += s.numel()
    return out


def grow_top(
    allocator: RankAllocator,
    layers: list[Layer],
    scores: Mapping[str, float],
    n: int,
    optimizer: torch.optim.Optimizer | None,
    last: Collection[str] = (),
) -> list[str]:
    """One more component (zero B column: outputs unchanged) on each of the ``n`` modules with the highest
    ``scores`` (modules in ``last`` after all others, ties in module order); returns the modules grown."""
    order = sorted(scores, key=lambda name: (name in last, -scores[name]))  # stable: ties keep module order
    chosen = order[:n]
    for name, wrapper, _ in layers:
        if name in chosen:
            allocator.grow(wrapper, name, 1, optimizer)
    return chosen


def move(
    allocator: RankAllocator,
    layers: list[Layer],
    scores: Mapping[str, torch.Tensor],
    k: int,
    optimizer: torch.optim.Optimizer | None,
    protected: Mapping[str, int] | None = None,
    unpruned_first: bool = False,
) -> tuple[dict[str, list[int]], list[str]]:
    """Move up to ``k`` components: mask the lowest (:func:`lowest`), remove them, and grow as many modules by
    one, those with the highest mean score over their remaining components (with ``unpruned_first``, modules
    that lost none before the others). Returns ({module: pruned indices}, modules grown); the total rank is
    unchanged, and so are the outputs after the masking (removal and growth add nothing)."""
    masks = lowest(scores, k, protected)
    pruned = {name: (~m).nonzero().view(-1).tolist() for name, m in masks.items() if not m.all()}
    means = {name: float(scores[name].float().cpu()[m].mean()) for name, m in masks.items()}
    apply_masks(layers, masks)  # the pruned components' B columns := 0: the only change to the outputs
    remove_masked(allocator, layers, masks, optimizer)
    n = sum(len(v) for v in pruned.values())
    grown = grow_top(allocator, layers, means, n, optimizer, list(pruned) if unpruned_first else ())
    return pruned, grown


def check_move(allocator: RankAllocator, layers: list[Layer], k: int) -> None:
    """ConfigErrors for a rank-moving allocator: the budget is the attached total (it is held constant), and
    ``k`` components can leave (one per module stays) and ``k`` modules can each grow one."""
    total, n = allocator.total_rank(layers), len(layers)
    if allocator.budget != total:
        raise ConfigError(
            f"{allocator.name}: budget={allocator.budget} differs from the attached total rank {total} over {n} "
            f"modules; the budget is held constant while ranks move, so set budget={total} (or attach r so that "
            "the total rank is the budget)."
        )
    if k > n or k > total - n:
        raise ConfigError(
            f"{allocator.name}: k={k} components cannot move each time: at most {min(n, total - n)} can (one rank "
            f"stays in each of the {n} modules, and at most one grows per module); lower k or attach a larger r."
        )


def check_window(allocator: RankAllocator, steps: int, t_init: int, t_final: int) -> None:
    """ConfigErrors for a schedule (warm-up ``t_init`` steps, final ``t_final`` steps) that leaves no step."""
    allocator.check_schedule(steps, t_init=t_init, t_final=t_final)
    if t_init + t_final >= steps:
        raise ConfigError(
            f"{allocator.name}: t_init + t_final = {t_init + t_final} leaves no step of the {steps}-step run to "
            "allocate in; the schedule would end after training ends. Lower them or raise steps."
        )


def due(step: int, steps: int, t_init: int, t_final: int, every: int) -> bool:
    """Whether optimizer step ``step`` (1-based) allocates: t_init < step ≤ steps − t_final, every ``every``."""
    return t_init < step <= steps - t_final and (step - t_init) % every == 0
