"""Re-factor an existing LoRA to a lower rank (or an energy target) without forming d_out×d_in matrices.

``lowrank.factor_svd`` gives ΔW = s·B·A's exact SVD from QR of the factors and an r×r
core; truncating it is the best rank-k approximation (Eckart–Young).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFormatError
from lorakit.extract.lowrank import RankRule
from lorakit.io.factors import AdapterFactors, read_factors, write_factors
from lorakit.lowrank import LoraFactors, factor_svd


def resize(
    adapter: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    max_rank: int | None = None,
) -> dict[str, Any]:
    """Write ``adapter`` re-factored to the rank the rule picks per module; returns the per-module report."""
    if Path(out).resolve() == Path(adapter).resolve():
        raise AdapterFormatError(f"--out {out} is the input adapter; write the resized adapter to a new folder.")
    rule = RankRule(rank=rank, energy=energy, ratio=ratio, max_rank=max_rank)
    src = read_factors(adapter)
    factors: dict[str, LoraFactors] = {}
    report: dict[str, Any] = {}
    for module, f in src.factors.items():
        U, S, Vh = factor_svd(f)
        total = float(S.square().sum())
        if total == 0.0:
            factors[module] = LoraFactors(f.A[:1] * 0, f.B[:, :1] * 0, 1.0)  # an all-zero delta: rank 1 of zeros
            report[module] = {"from": f.A.shape[0], "rank": 1, "energy": 1.0, "rel_error": 0.0}
            continue
        k = rule.choose(S.square(), total, min(f.B.shape[0], f.A.shape[1]))
        k = min(k or S.numel(), S.numel())
        kept = float(S[:k].square().sum()) / total
        B, A = (U[:, :k] * S[:k]).to(f.B.dtype), Vh[:k].to(f.A.dtype)  # (out, k), (k, in)
        factors[module] = LoraFactors(A.contiguous(), B.contiguous(), 1.0)
        report[module] = {
            "from": int(f.A.shape[0]),
            "rank": k,
            "energy": kept,
            "rel_error": math.sqrt(max(0.0, 1.0 - kept)),
        }
    resized = AdapterFactors(factors, src.kinds, src.saved, src.base_name, src.task_type, src.fingerprint)
    rule_fields = {k: v for k, v in vars(rule).items() if v is not None}
    extra = {"resize_report.json": json.dumps({"rule": rule_fields, "modules": report}, indent=2) + "\n"}
    write_factors(out, resized, extra_files=extra, provenance={"made_by": "lorakit resize", "from": str(adapter)})
    return report
