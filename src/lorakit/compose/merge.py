"""The merge driver: check K adapter dirs against each other, merge module by module, write one adapter.

Inputs are read as factors (``io.factors.read_factors``: ΔW_i = s_i·B_i@A_i, (out, in)); each
module is merged on its own, so at most one module's K deltas exist at a time (and none for the
factor-level methods). The output is a PEFT LoRA dir with per-module ranks (``rank_pattern``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lorakit.compose._api import MergeSpec, check_options, factorize, get_merge_method, refactor
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.io.factors import AdapterFactors, read_factors, write_factors
from lorakit.io.peft_format import check_same_base
from lorakit.lowrank import LoraFactors

MISSING = ("error", "zero")


def merge_module(
    spec: MergeSpec,
    factors: list[LoraFactors],
    weights: list[float],
    *,
    rank: int | None = None,
    energy: float | None = None,
    options: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> LoraFactors:
    """Merge one module's factors with ``spec``; the result has scale 1.

    Output rank: with ``energy``, the fewest singular values keeping that fraction of Σσ², at most
    ``rank`` if given; else ``rank``; else the method's default (Σ r_i for the exact and the delta
    methods, max r_i for ``svd``). Always capped at min(out, in), which an exact concatenation
    reaches without loss.
    """
    fs = [LoraFactors(f.A.float(), f.B.float(), float(f.scale)) for f in factors]
    kwargs = dict(options or {})
    if spec.seeded:
        kwargs["generator"] = generator
    ranks = [f.A.shape[0] for f in fs]
    cap = min(fs[0].B.shape[0], fs[0].A.shape[1])
    default = sum(ranks) if spec.default_rank == "sum" else max(ranks)
    k = rank if rank is not None else (cap if energy is not None else min(default, cap))
    if spec.needs_delta:
        deltas = [f.scale * (f.B @ f.A) for f in fs]  # K × (out, in), this module only
        return factorize(spec.fn(deltas, weights, **kwargs), k, energy)
    merged: LoraFactors = spec.fn(fs, weights, **kwargs)
    if rank is None and energy is None and merged.A.shape[0] <= k:
        return merged  # the exact stacked factors
    return refactor(merged, k, energy)


def _check_modules(paths: list[Path], adapters: list[AdapterFactors], missing: str) -> list[str]:
    """All modules in first-seen order, after checking presence, kinds and (out, in) shapes agree."""
    modules = list(dict.fromkeys(m for a in adapters for m in a.factors))
    for path, adapter in zip(paths, adapters, strict=True):
        if adapter.saved:
            raise AdapterFormatError(
                f"{path} has whole saved modules (modules_to_save: {', '.join(adapter.saved)}), which cannot be "
                "merged as low-rank deltas; merge adapters without modules_to_save."
            )
        absent = [m for m in modules if m not in adapter.factors]
        if absent and missing == "error":
            raise AdapterFormatError(
                f"{path} has no LoRA for {len(absent)} module(s) other adapters adapt, e.g. {', '.join(absent[:3])}; "
                'pass missing="zero" (CLI: --missing zero) to treat them as zero deltas.'
            )
    for module in modules:
        seen = [(p, a) for p, a in zip(paths, adapters, strict=True) if module in a.factors]
        p0, a0 = seen[0]
        shape0 = (a0.factors[module].B.shape[0], a0.factors[module].A.shape[1])
        for path, adapter in seen[1:]:
            f = adapter.factors[module]
            if (f.B.shape[0], f.A.shape[1]) != shape0 or adapter.kinds[module] != a0.kinds[module]:
                raise AdapterFormatError(
                    f"{module}: {path} has a {adapter.kinds[module]} delta of shape (out, in) = "
                    f"{(f.B.shape[0], f.A.shape[1])} but {p0} a {a0.kinds[module]} of {shape0}; "
                    "the adapters are for different models."
                )
    return modules


def _check_numbers(
    n: int, weights: Sequence[float] | None, rank: int | None, energy: float | None, missing: str
) -> list[float]:
    if n == 0:
        raise ConfigError("give at least one adapter dir to merge.")
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(ws) != n:
        raise ConfigError(f"got {len(ws)} weight(s) for {n} adapter(s); give one weight per adapter (or none).")
    if rank is not None and rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be in (0, 1] (the fraction of Σσ² kept), got {energy}.")
    if missing not in MISSING:
        raise ConfigError(f"missing must be one of {', '.join(MISSING)}, got {missing!r}.")
    return ws


def _check_rank(paths: list[Path], adapters: list[AdapterFactors], modules: list[str], rank: int | None) -> None:
    if rank is None:
        return
    for module in modules:
        path, f = next((p, a.factors[module]) for p, a in zip(paths, adapters, strict=True) if module in a.factors)
        cap = min(f.B.shape[0], f.A.shape[1])
        if rank > cap:
            raise ConfigError(
                f"rank {rank} is larger than module {module} allows (its delta is {f.B.shape[0]}×{f.A.shape[1]}, "
                f"so at most rank {cap}; see {path}); choose rank ≤ {cap} or use energy=."
            )


def _out_dtype(adapters: list[AdapterFactors]) -> torch.dtype:
    dtypes = {f.A.dtype for a in adapters for f in a.factors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def merge_adapters(
    paths: Sequence[str | Path],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    *,
    out: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    missing: str = "error",
    seed: int = 0,
    progress: bool = False,
    **opts: Any,
) -> Path:
    """Merge the LoRA adapter dirs ``paths`` with ``method`` and ``weights`` (default all 1) into ``out``.

    ``opts`` are the method's options (``density``, ``gamma``, ``lam``; see ``lorakit merge --help``);
    ``seed`` seeds the random methods (dare_*, ortho_dropout). Modules only some adapters adapt are
    an error unless ``missing="zero"``. The write is atomic; returns ``out``.
    """
    spec = get_merge_method(method)
    options = check_options(spec, opts)
    dirs = [Path(p) for p in paths]
    ws = _check_numbers(len(dirs), weights, rank, energy, missing)
    adapters = [read_factors(p) for p in dirs]
    check_same_base(
        [(p, a.base_name, a.fingerprint) for p, a in zip(dirs, adapters, strict=True)],
        "only adapters of the same base model can be merged.",
    )
    modules = _check_modules(dirs, adapters, missing)
    _check_rank(dirs, adapters, modules, rank)
    generator = torch.Generator().manual_seed(seed)
    merged: dict[str, LoraFactors] = {}
    kinds: dict[str, str] = {}
    for module in tqdm(modules, desc=f"merge ({method})", unit="module", disable=not progress, file=sys.stderr):
        present = [(a.factors[module], w) for a, w in zip(adapters, ws, strict=True) if module in a.factors]
        fs, mw = [f for f, _ in present], [w for _, w in present]
        merged[module] = merge_module(
            spec, fs, mw, rank=rank, energy=energy, options=options, generator=generator
        )  # A (k, in), B (out, k)
        kinds[module] = next(a.kinds[module] for a in adapters if module in a.kinds)
    fingerprint = {m: v for a in reversed(adapters) for m, v in a.fingerprint.items()}
    base_name = next((a.base_name for a in adapters if a.base_name), None)
    result = AdapterFactors(merged, kinds, {}, base_name, adapters[0].task_type, fingerprint)
    provenance = {
        "merge": {
            "method": method,
            "adapters": [str(p) for p in dirs],
            "weights": ws,
            "options": options,
            "rank": rank,
            "energy": energy,
            "missing": missing,
            "seed": seed,
        }
    }
    return write_factors(out, result, dtype=_out_dtype(adapters), provenance=provenance)
