"""Compress then Serve: Serving Thousands of LoRA Adapters with Little Overhead — https://arxiv.org/abs/2407.00066
Rule: per module, ΔW_c = s_c·B_c·A_c ≈ U·Σ_c·Vᵀ with a shared orthonormal U (d_out, R), V (d_in, R) and Σ_c = Uᵀ ΔW_c V.

The fit, per module over the C adapters that adapt it (an adapter without the module has Σ_c = 0):

- U = top-R eigenvectors of Σ_c ΔW_c ΔW_cᵀ = Σ_c B̃_c (A_c A_cᵀ) B̃_cᵀ (B̃_c = s_c·B_c), V likewise from
  Σ_c ΔW_cᵀ ΔW_c. Both come from the stacked factors [B̃_c T_c] with T_c T_cᵀ = A_c A_cᵀ (an r×r QR
  factor): a thin QR + a small SVD, or an SVD of the stacked (d, Σ r_c) matrix when d ≤ Σ r_c. No
  d_out×d_in matrix is formed.
- Σ_c = (Uᵀ B̃_c)(A_c V), the least-squares optimum for fixed U, V.
- ``iters`` rounds of alternating refinement (Tucker-2 / HOOI): U ← top-R left singular vectors of
  [ΔW_c V]_c, then V ← top-R of [ΔW_cᵀ U]_c. Each half-step maximises the captured energy
  Σ_c ‖Uᵀ ΔW_c V‖² over one factor with the other fixed, so the error never increases.
- Error per adapter, from factors: ‖ΔW_c − U Σ_c Vᵀ‖² = ‖ΔW_c‖² − ‖Σ_c‖² (U, V orthonormal, Σ_c the
  projection), with ‖ΔW_c‖² = tr((B̃_cᵀ B̃_c)(A_c A_cᵀ)). The reported error of adapter c is
  Σ_m ‖ΔW_c − U Σ_c Vᵀ‖² / Σ_m ‖ΔW_c‖² (the share of its delta's energy the collection loses);
  it is 0 when R ≥ Σ_c r_c in every module.

R must be ≤ min(d_in, d_out) of every module (refused otherwise: one R keeps every core (R, R)).
When R exceeds a module's stacked rank, U and V are completed with orthonormal directions whose
core entries are 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.io.adapter import read_config
from lorakit.io.collection import META_NAME, check_names, write_collection
from lorakit.io.factors import AdapterFactors, read_factors
from lorakit.io.peft_format import check_same_base, require_plain_lora
from lorakit.lowrank import LoraFactors

F64 = torch.float64


@dataclass
class CompressReport:
    """What ``compress`` wrote and how well the collection reproduces each adapter."""

    path: Path
    names: list[str]
    rank: int
    errors: dict[str, float]  # name -> Σ_m ‖ΔW − UΣVᵀ‖² / Σ_m ‖ΔW‖²
    params_before: int  # Σ_c Σ_m r_c·(d_in + d_out)
    params_after: int  # Σ_m R·(d_in + d_out) + C·R²
    bytes_before: int
    bytes_after: int
    history: list[float] = field(default_factory=list)  # total relative error after the fit and each half-step

    @property
    def ratio(self) -> float:
        """Compression ratio: stored adapter parameters before / after."""
        return self.params_before / max(self.params_after, 1)


@dataclass
class ModuleFit:
    U: torch.Tensor  # (d_out, R)
    V: torch.Tensor  # (d_in, R)
    cores: torch.Tensor  # (C, R, R)
    energy: torch.Tensor  # (C,) ‖ΔW_c‖²
    lost: torch.Tensor  # (C,) ‖ΔW_c − U Σ_c Vᵀ‖²
    history: list[torch.Tensor]  # (C,) lost energy after the fit and after each half-step


def _gram_root(X: torch.Tensor) -> torch.Tensor:
    """T (r, p) with T Tᵀ = X Xᵀ for X (r, k), p = min(r, k): Xᵀ = QR gives X Xᵀ = RᵀR."""
    return torch.linalg.qr(X.T).R.T  # (r, p)


def _top_eigvecs(G: torch.Tensor, rank: int, seed: int, oversample: int = 16, iters: int = 6) -> torch.Tensor:
    """Leading eigenvectors of the PSD G (d, d), descending: all of them from ``eigh`` when d is small or
    ``rank`` near d, else ``rank + oversample`` by subspace iteration with Rayleigh–Ritz (a d×d ``eigh``
    costs seconds at d = 1536, the iteration milliseconds; it is exact once rank(G) ≤ rank + oversample).
    """
    d = G.shape[0]
    k = rank + oversample
    if d <= 512 or 2 * k >= d:
        return torch.linalg.eigh(G).eigenvectors.flip(1)  # (d, d)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(G @ torch.randn(d, k, generator=g, dtype=G.dtype)).Q  # (d, k)
    for _ in range(iters):
        Q = torch.linalg.qr(G @ Q).Q
    evecs = torch.linalg.eigh(Q.T @ G @ Q).eigenvectors.flip(1)  # (k, k), descending
    return Q @ evecs  # (d, k)


def _top_basis(M: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """The top-``rank`` left singular vectors of M (d, K), completed to ``rank`` orthonormal columns if needed."""
    d, K = M.shape
    if d <= K:  # eigenvectors of the d×d Gram M·Mᵀ: much cheaper than an SVD of M when K ≫ d (many adapters)
        U = _top_eigvecs(M @ M.T, rank, seed)  # (d, ≥ rank), descending σ²
    else:
        Q, Rm = torch.linalg.qr(M)  # Q (d, K), Rm (K, K)
        U = Q @ torch.linalg.svd(Rm).U  # (d, K)
    if U.shape[1] >= rank:
        return U[:, :rank].contiguous()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, rank - U.shape[1], generator=g, dtype=M.dtype)  # (d, extra)
    for _ in range(2):  # twice: re-orthogonalisation keeps the completion orthogonal to float precision
        X = X - U @ (U.T @ X)
    return torch.cat([U, torch.linalg.qr(X).Q], dim=1)  # (d, rank)


def _lost(
    fs: list[tuple[torch.Tensor, torch.Tensor]], energy: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cores (n, R, R), lost energy (n,)) of the present adapters' (Ã, B̃) for the basis U, V."""
    cores = torch.stack([(U.T @ B) @ (A @ V) for A, B in fs])  # (n, R, R)
    return cores, (energy - cores.square().sum(dim=(1, 2))).clamp_min(0)


def fit_module(factors: Sequence[LoraFactors | None], rank: int, iters: int = 0) -> ModuleFit:
    """Shared U, V and per-adapter cores for one module; ``None`` marks an adapter without the module."""
    idx = [i for i, f in enumerate(factors) if f is not None]
    fs = [(f.A.to(F64), f.B.to(F64) * f.scale) for f in factors if f is not None]  # A (r, in), B̃ (out, r)
    energy = torch.stack([torch.trace((B.T @ B) @ (A @ A.T)) for A, B in fs])  # (n,) ‖ΔW_c‖²
    U = _top_basis(torch.cat([B @ _gram_root(A) for A, B in fs], dim=1), rank)  # ΣΔWΔWᵀ = Σ B̃(AAᵀ)B̃ᵀ
    V = _top_basis(torch.cat([A.T @ _gram_root(B.T) for A, B in fs], dim=1), rank)  # ΣΔWᵀΔW = Σ Aᵀ(B̃ᵀB̃)A
    history = [_lost(fs, energy, U, V)[1]]
    for _ in range(iters):
        U = _top_basis(torch.cat([B @ _gram_root(A @ V) for A, B in fs], dim=1), rank)  # of [ΔW_c V]
        history.append(_lost(fs, energy, U, V)[1])
        V = _top_basis(torch.cat([A.T @ _gram_root(B.T @ U) for A, B in fs], dim=1), rank)  # of [ΔW_cᵀ U]
        history.append(_lost(fs, energy, U, V)[1])
    cores, lost = _lost(fs, energy, U, V)
    all_cores = torch.zeros(len(factors), rank, rank, dtype=F64)  # (C, R, R)
    all_cores[idx] = cores
    n = len(factors)
    full = [torch.zeros(n, dtype=F64).index_copy(0, torch.tensor(idx), h) for h in (energy, lost, *history)]
    return ModuleFit(U, V, all_cores, full[0], full[1], full[2:])


def _check_inputs(paths: list[Path], names: list[str], rank: int, iters: int, out: Path, overwrite: bool) -> None:
    if len(paths) < 2:
        raise ConfigError(
            f"compress needs at least 2 adapters, got {len(paths)}; a single adapter needs no collection."
        )
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer (the shared rank R), got {rank!r}.")
    if iters < 0:
        raise ConfigError(f"iters must be ≥ 0 (rounds of alternating refinement), got {iters}.")
    if len(names) != len(paths):
        raise ConfigError(f"got {len(names)} name(s) for {len(paths)} adapter(s); give one name per adapter.")
    check_names(
        names,
        "compress",
        "names default to the dirs' names; pass names=[...] (CLI: --names a,b,...) to give each adapter its own.",
    )
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_NAME).exists())):
        raise ConfigError(f"{out} exists and is not a collection; refusing to replace it. Choose another --out.")


def _read(path: Path) -> AdapterFactors:
    require_plain_lora(
        read_config(path),
        path,
        f"export it to LoRA first (`lorakit export --format vllm {path} --out DIR`) and compress DIR/{path.name}.",
    )
    adapter = read_factors(path)
    if adapter.saved:
        raise AdapterFormatError(
            f"{path} saves whole modules (modules_to_save: {', '.join(adapter.saved)}), which a low-rank collection "
            "cannot hold; compress adapters without modules_to_save."
        )
    return adapter


def _modules(paths: list[Path], adapters: list[AdapterFactors], rank: int) -> dict[str, tuple[str, int, int]]:
    """module -> (kind, d_in, d_out) over the union of modules, after checking shapes, kinds and R."""
    out: dict[str, tuple[str, int, int]] = {}
    seen: dict[str, Path] = {}
    for path, adapter in zip(paths, adapters, strict=True):
        for module, f in adapter.factors.items():
            spec = (adapter.kinds[module], int(f.A.shape[1]), int(f.B.shape[0]))
            if out.setdefault(module, spec) != spec:
                raise AdapterFormatError(
                    f"{module}: {path} has a {spec[0]} delta with (d_in, d_out) = {spec[1:]} but {seen[module]} a "
                    f"{out[module][0]} with {out[module][1:]}; the adapters are for different models."
                )
            seen.setdefault(module, path)
    for module, (_, d_in, d_out) in out.items():
        if rank > min(d_in, d_out):
            raise ConfigError(
                f"rank {rank} is larger than module {module} allows (d_in {d_in}, d_out {d_out}: at most "
                f"{min(d_in, d_out)}); choose rank ≤ {min(min(s[1:]) for s in out.values())}."
            )
    return out


def compress(
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    rank: int,
    iters: int = 0,
    names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> CompressReport:
    """Jointly compress plain LoRA adapter dirs of one base into a collection at ``out`` (atomic write).

    ``rank`` is the shared rank R; ``iters`` rounds of alternating refinement lower the error further;
    ``names`` default to the dirs' names. Returns the per-adapter errors and the sizes before/after.
    """
    paths, out = [Path(p) for p in adapters], Path(out)
    names = [p.name for p in paths] if names is None else list(names)
    _check_inputs(paths, names, rank, iters, out, overwrite)
    loaded = [_read(p) for p in paths]
    check_same_base(
        [(p, a.base_name, a.fingerprint) for p, a in zip(paths, loaded, strict=True)],
        "a collection holds adapters of one base model only.",
    )
    modules = _modules(paths, loaded, rank)
    dtypes = {f.A.dtype for a in loaded for f in a.factors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    C = len(loaded)
    energy, lost = torch.zeros(C, dtype=F64), torch.zeros(C, dtype=F64)
    history: list[torch.Tensor] = []
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    before = after = 0
    for module in tqdm(modules, desc="compress", unit="module", disable=not progress, file=sys.stderr):
        fit = fit_module([a.factors.get(module) for a in loaded], rank, iters)
        tensors[module] = (fit.U.to(dtype), fit.V.to(dtype), fit.cores.to(dtype))
        energy, lost = energy + fit.energy, lost + fit.lost
        history = [h + x for h, x in zip(history, fit.history, strict=True)] if history else list(fit.history)
        _, d_in, d_out = modules[module]
        before += sum(int(a.factors[module].A.shape[0]) * (d_in + d_out) for a in loaded if module in a.factors)
        after += rank * (d_in + d_out) + C * rank * rank
    rel = (lost / energy.clamp_min(torch.finfo(F64).tiny)).tolist()
    errors = dict(zip(names, (float(e) for e in rel), strict=True))
    total = [float(h.sum() / energy.sum().clamp_min(torch.finfo(F64).tiny)) for h in history]
    fingerprint = {m: v for a in reversed(loaded) for m, v in a.fingerprint.items()}
    provenance: dict[str, Any] = {"sources": [str(p) for p in paths], "iters": iters, "history": total}
    write_collection(
        out,
        names=names,
        rank=rank,
        modules=tensors,
        kinds={m: k for m, (k, _, _) in modules.items()},
        errors=errors,
        base_name=next((a.base_name for a in loaded if a.base_name), None),
        fingerprint=fingerprint,
        task_type=loaded[0].task_type,
        extra={"provenance": provenance},
    )
    size = torch.empty(0, dtype=dtype).element_size()
    return CompressReport(out, names, rank, errors, before, after, before * size, after * size, total)
