"""What the rank allocators share (AdaLoRA first; its descendants reuse it): sensitivity scores with EMA and
uncertainty, the cubic budget schedule, a global top-k allocation, and rank surgery that removes components
from an adapter (smaller tensors, its optimizer state sliced alike) or adds new ones (IncreLoRA).

Rank surgery keeps outputs unchanged exactly when the removed components contribute nothing (AdaLoRA's masked
Λ = 0): the adapter is rebuilt at the smaller rank by its own ``from_base`` and loaded with its kept slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.methods._api import AdapterModule


class Sensitivity:
    """Smoothed importance per element (AdaLoRA, eq. 8–10): I = |p·∇p|, Ī ← β₁Ī + (1−β₁)I,
    Ū ← β₂Ū + (1−β₂)|I − Ī|; the score is Ī·Ū. Keys are whatever the caller names its tensors by."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 < beta < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {beta!r}.")
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}  # Ī
        self.unc: dict[str, torch.Tensor] = {}  # Ū

    @torch.no_grad()
    def update(self, key: str, p: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Fold this step's |p·grad| into the averages of ``key`` (no gradient: zero importance)."""
        ipt = (p * grad).abs() if grad is not None else torch.zeros_like(p)
        avg = self.avg.get(key, torch.zeros_like(p))
        unc = self.unc.get(key, torch.zeros_like(p))
        self.avg[key] = avg = self.beta1 * avg + (1 - self.beta1) * ipt
        self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def score(self, key: str) -> torch.Tensor:
        """Ī·Ū of every element of ``key``'s tensor."""
        return self.avg[key] * self.unc[key]

    def reset(self) -> None:
        self.avg.clear()
        self.unc.clear()


def cubic_budget(step: int, *, initial: int, final: int, t_init: int, t_final: int, total: int) -> int:
    """AdaLoRA's schedule (eq. 13): ``initial`` for step ≤ t_init, ``final`` after total − t_final, and between
    them final + (initial − final)·(1 − (step − t_init)/(total − t_final − t_init))³, rounded down."""
    if step <= t_init:
        return initial
    if step > total - t_final:
        return final
    progress = 1 - (step - t_init) / (total - t_final - t_init)
    return int((initial - final) * progress**3 + final)


def top_k(scores: Mapping[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """{key: boolean mask} keeping the ``budget`` highest scores over all keys (each a 1-D tensor): exactly
    ``budget`` kept, ties broken by order (PEFT's threshold ``score > k-th smallest`` where scores differ)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    if not 0 <= budget <= flat.numel():
        raise ConfigError(f"budget {budget} is outside 0..{flat.numel()} (the components there are).")
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = True
    masks, start = {}, 0
    for key, s in scores.items():
        masks[key] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def _rebuild(adapter: AdapterModule, base: nn.Module, r: int) -> AdapterModule:
    """A fresh adapter of ``adapter``'s method at rank ``r`` (its own ``from_base`` init), with ``alpha``
    rescaled where the scale depends on r (LoRA's α/r, α/√r with rsLoRA) so the scale stays the same, and the
    same ``init_shift`` (saving folds it back into the base whatever the rank)."""
    cfg = adapter.config
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "r" not in fields:
        raise ConfigError(f"method {adapter.method_name!r} has no rank r, so it has no rank components to change.")
    new = type(adapter).from_base(base, dataclasses.replace(cfg, r=r))
    if new.scale != adapter.scale and "alpha" in fields:  # a scale α/r or α/√r: keep s by rescaling α
        alpha = cfg.alpha * adapter.scale / new.scale
        new = type(adapter).from_base(base, dataclasses.replace(cfg, r=r, alpha=alpha))
    new.train(adapter.training)
    new.init_shift = adapter.init_shift  # what an init (PiSSA, ...) took out of the base: rank-independent
    return new


def _resize(
    adapter: AdapterModule,
    new: AdapterModule,
    optimizer: torch.optim.Optimizer | None,
    resize: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor],
) -> AdapterModule:
    """Load ``new`` with ``resize(old, dim, fresh)`` of each ``export_state`` tensor whose shape changed in one
    dimension ``dim`` (``fresh``: ``new``'s own init there; unchanged tensors are copied) and move the
    ``optimizer``'s state alike (``fresh`` None: the state's slots for new components are zeros)."""
    old_state, new_state = adapter.export_state(), new.export_state()
    loaded: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    for key, old in old_state.items():
        changed = [d for d, (a, b) in enumerate(zip(old.shape, new_state[key].shape, strict=True)) if a != b]
        assert len(changed) <= 1, f"{key}: the rank is in one dimension, got {old.shape} -> {new_state[key].shape}"
        dims[key] = changed[0] if changed else None
        fresh = new_state[key].detach().clone()
        loaded[key] = resize(old.detach(), changed[0], fresh) if changed else old.detach()
    new.import_state(loaded)
    for key, old in old_state.items():
        new_state[key].requires_grad_(old.requires_grad)
        if optimizer is not None:
            _swap_in_optimizer(optimizer, old, new_state[key], dims[key], resize)
    return new


def keep_components(
    adapter: AdapterModule, base: nn.Module, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> AdapterModule:
    """A copy of ``adapter`` with only the rank components at indices ``keep`` (config ``r`` = len(keep)).

    The method's ``from_base`` builds it at the new rank (with ``alpha`` rescaled where the scale depends on r,
    as LoRA's α/r: saved as PEFT's alpha_pattern); each tensor of ``export_state`` whose shape changed in
    one dimension is the old one's ``index_select`` there, and so is its ``optimizer`` state (the old parameter
    is swapped for the new one in the optimizer's groups). The caller installs the result.
    """
    new = _rebuild(adapter, base, int(keep.numel()))

    def select(old: torch.Tensor, dim: int, fresh: torch.Tensor | None) -> torch.Tensor:
        return old.index_select(dim, keep.to(old.device))

    return _resize(adapter, new, optimizer, select)


def add_components(
    adapter: AdapterModule, base: nn.Module, k: int, optimizer: torch.optim.Optimizer | None = None
) -> AdapterModule:
    """A copy of ``adapter`` with ``k`` more rank components (config ``r`` + k), appended after the old ones.

    The counterpart of :func:`keep_components` (same rebuild, alpha rescale and optimizer swap): the old
    components are copied, the new ones are the method's own ``from_base`` init there (LoRA: Kaiming A rows and
    zero B columns; embeddings zero A rows), so they contribute nothing and the output is unchanged; their
    optimizer state (moments) starts at zeros. The caller installs the result.
    """
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"add_components: k must be a positive integer, got {k!r}.")
    new = _rebuild(adapter, base, int(adapter.config.r) + k)

    def grow(old: torch.Tensor, dim: int, fresh: torch.Tensor | None) -> torch.Tensor:
        shape = list(old.shape)
        shape[dim] = k
        tail = fresh.narrow(dim, fresh.shape[dim] - k, k) if fresh is not None else old.new_zeros(shape)
        return torch.cat([old, tail.to(old)], dim=dim)

    return _resize(adapter, new, optimizer, grow)


def _swap_in_optimizer(
    optimizer: torch.optim.Optimizer,
    old: torch.Tensor,
    new: torch.Tensor,
    dim: int | None,
    resize: Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor],
) -> None:
    """Put ``new`` where ``old`` is in the optimizer's groups, its state resized like the tensor."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            k: resize(v, dim, None) if dim is not None and v.shape == old.shape else v for k, v in state.items()
        }
