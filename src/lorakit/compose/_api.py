"""The merge-method contract, its registry and the low-rank algebra every merge shares.

A merge method is one file in ``lorakit/compose/`` holding one function decorated with
``@merge_method(name, paper=..., url=..., exact=..., needs_delta=...)``; importing
``lorakit.compose`` imports every such file, so adding a method edits no other file.

Two kinds of method, one module at a time (ΔW_i = s_i·B_i@A_i in (out, in)):

- ``needs_delta=False``: ``fn(factors, weights, **opts) -> LoraFactors`` works on the factors
  alone (concatenation along the rank), never building an out×in matrix;
- ``needs_delta=True``: ``fn(deltas, weights, **opts) -> Tensor`` gets the materialised (out, in)
  deltas of one module; the driver re-factors its result to the output rank.

Options are the function's keyword-only parameters (their defaults are the defaults); a
parameter named ``generator`` receives the merge's seeded ``torch.Generator`` instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorakit.errors import ConfigError
from lorakit.lowrank import LoraFactors, factor_svd
from lorakit.registry import get_entry

RankRule = Literal["sum", "max"]


@dataclass(frozen=True)
class MergeSpec:
    """What the registry knows about one merge method."""

    name: str
    fn: Callable[..., Any]
    paper: str
    url: str
    exact: bool  # the written adapter is the method's formula exactly (no re-factoring loss by default)
    needs_delta: bool  # works on materialised (out, in) deltas, one module at a time
    default_rank: RankRule  # output rank when none is given: Σ r_i (capped at min(out, in)) or max r_i
    options: dict[str, Any]  # user options (keyword-only parameters) -> default
    seeded: bool  # takes the merge's ``generator``


MERGE_METHODS: dict[str, MergeSpec] = {}


def merge_method(
    name: str, *, paper: str, url: str, exact: bool, needs_delta: bool, default_rank: RankRule = "sum"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a merge function under ``name`` (see the module docstring for its signature)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in MERGE_METHODS and MERGE_METHODS[name].fn is not fn:
            raise ValueError(f"merge method {name!r} is registered twice")
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "generator"}
        seeded = any(p.name == "generator" for p in params)
        MERGE_METHODS[name] = MergeSpec(name, fn, paper, url, exact, needs_delta, default_rank, options, seeded)
        return fn

    return wrap


def get_merge_method(name: str) -> MergeSpec:
    """The registered merge method ``name``; an unknown name gets close suggestions."""
    return get_entry(MERGE_METHODS, "merge method", name)


def check_options(spec: MergeSpec, opts: dict[str, Any]) -> dict[str, Any]:
    """``spec``'s options with ``opts`` applied, after checking names and the shared value ranges."""
    unknown = sorted(set(opts) - set(spec.options))
    if unknown:
        valid = ", ".join(sorted(spec.options)) or "none"
        raise ConfigError(f"merge method {spec.name!r} has no option(s) {', '.join(unknown)}; its options: {valid}.")
    full = {**spec.options, **opts}
    density, gamma = full.get("density"), full.get("gamma")
    if density is not None and not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got {density}.")
    if gamma is not None and not 0.0 <= float(gamma) < 1.0:
        raise ConfigError(f"gamma must be in [0, 1) (the fraction of largest entries dropped), got {gamma}.")
    if density is not None and gamma is not None and float(density) + float(gamma) > 1.0:
        raise ConfigError(f"density + gamma must be ≤ 1 (kept band + dropped top), got {density} + {gamma}.")
    return full


def keep_rank(S: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: the fewest reaching ``energy`` of Σσ², capped by ``rank``."""
    n = S.numel()
    k = n if rank is None else min(rank, n)
    if energy is not None:
        power = S.double() ** 2  # (n,)
        total = float(power.sum())
        cum = torch.cumsum(power, 0) / max(total, 1e-300)  # (n,); a zero delta keeps one (zero) direction
        k = min(k, int((cum < energy - 1e-12).sum()) + 1 if total > 0 else 1)
    return max(1, min(k, n))


def refactor(f: LoraFactors, rank: int | None = None, energy: float | None = None) -> LoraFactors:
    """Best rank-k approximation (Eckart–Young) of s·B@A from the factors alone: QR of each side, SVD of the core.

    s·B@A = (Qb Rb)(Qa Ra)ᵀ = Qb (Rb Raᵀ) Qaᵀ, so the singular values of the small core Rb Raᵀ are
    those of ΔW; no (out, in) matrix is formed. The result has scale 1.
    """
    U, S, Vh = factor_svd(f, torch.float32)  # U (out, n), S (n,), Vh (n, in)
    k = keep_rank(S, rank, energy)
    return LoraFactors(Vh[:k], U[:, :k] * S[:k], 1.0)  # A (k, in), B (out, k)


def factorize(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LoraFactors:
    """Best rank-k approximation (Eckart–Young) of an (out, in) delta as B@A with scale 1."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)  # U (out, n), S (n,), Vh (n, in)
    k = keep_rank(S, rank, energy)
    return LoraFactors(Vh[:k], U[:, :k] * S[:k], 1.0)  # A (k, in), B (out, k)


def concat(factors: list[LoraFactors], coefficients: list[float], *, into: Literal["A", "B"] = "B") -> LoraFactors:
    """Stack factors along the rank: B@A = Σ c_i·s_i·B_i@A_i exactly, with c_i·s_i folded into ``into``."""
    folded = [c * f.scale for c, f in zip(coefficients, factors, strict=True)]
    if into == "A":
        A = torch.cat([k * f.A.float() for k, f in zip(folded, factors, strict=True)], 0)  # (Σr, in)
        B = torch.cat([f.B.float() for f in factors], 1)  # (out, Σr)
    else:
        A = torch.cat([f.A.float() for f in factors], 0)  # (Σr, in)
        B = torch.cat([k * f.B.float() for k, f in zip(folded, factors, strict=True)], 1)  # (out, Σr)
    return LoraFactors(A, B, 1.0)


def top_magnitude_mask(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the ``int(fraction·numel)`` entries of largest |t| (PEFT's top-k rule)."""
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    k = int(fraction * t.numel())
    if k > 0:
        mask[torch.topk(t.abs().reshape(-1), k=k).indices] = True
    return mask.reshape(t.shape)
