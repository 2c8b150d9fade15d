"""``lk.analyze``: read an adapter's factors (and optionally its base and a full fine-tune) and measure them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lorakit.analysis.intruders import base_vectors, check_settings, find_intruders
from lorakit.analysis.overlap import compare as compare_adapters
from lorakit.analysis.report import AnalysisReport, ModuleReport, layer_of
from lorakit.analysis.spectra import spectrum
from lorakit.analysis.weights import module_weight
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.extract.checkpoint import Checkpoint
from lorakit.io.factors import AdapterFactors, read_factors
from lorakit.io.peft_format import check_base_norms
from lorakit.lowrank import LoraFactors

NO_BASE_NOTE = "intruder dimensions skipped: give a base (--base NAME_OR_DIR) to compare W0 + ΔW with W0."


def analyze(
    adapter_dir: str | Path,
    base: str | Path | None = None,
    tuned: str | Path | None = None,
    *,
    threshold: float = 0.5,
    top_k: int = 10,
    compare: Sequence[str | Path] = (),
) -> AnalysisReport:
    """Spectra, energy, effective/stable rank per module; intruder dimensions with a ``base``; overlaps.

    ``base`` is a bundled name (``"smollm2-135m"``) or a local HF checkpoint dir; ``tuned`` is a full
    fine-tune of that base whose weights get the same intruder count; ``compare`` lists other adapter
    dirs whose per-module subspace overlap and interference with this one are reported.
    """
    check_settings(top_k, threshold)
    if tuned is not None and base is None:
        raise ConfigError("--tuned needs --base: intruder dimensions of a full fine-tune are measured against W0.")
    adapter = read_factors(adapter_dir)
    if not adapter.factors:
        raise AdapterFormatError(f"{adapter_dir} holds no LoRA factors (only saved modules); nothing to analyse.")
    report = AnalysisReport(
        str(adapter_dir),
        [],
        base=None if base is None else str(base),
        tuned=None if tuned is None else str(tuned),
        top_k=top_k,
        threshold=threshold,
    )
    base_ckpt = Checkpoint(base) if base is not None else None
    tuned_ckpt = Checkpoint(tuned) if tuned is not None else None
    missing: list[str] = []
    for name in sorted(adapter.factors, key=_natural):
        m = ModuleReport(name, adapter.kinds[name], spectrum(adapter.factors[name]))
        if base_ckpt is not None and not _measure_intruders(m, adapter, base_ckpt, tuned_ckpt, report):
            missing.append(name)
        report.modules.append(m)
    if base_ckpt is None:
        report.notes.append(NO_BASE_NOTE)
    if missing:
        report.notes.append(f"{len(missing)} module(s) have no weight in the base, so no intruders: {missing[:5]}")
    report.comparisons = [compare_adapters(adapter, read_factors(other), str(other)) for other in compare]
    return report


def _natural(name: str) -> tuple[int, str]:
    layer = layer_of(name)
    return (-1 if layer is None else layer, name)


def _measure_intruders(
    m: ModuleReport, adapter: AdapterFactors, base: Checkpoint, tuned: Checkpoint | None, report: AnalysisReport
) -> bool:
    """Fill ``m``'s base-relative fields; False when the base checkpoint lacks the module."""
    W0 = module_weight(base, m.module, m.kind, m.spectrum.shape)  # (out, in)
    if W0 is None:
        return False
    norm0 = float(W0.norm())
    check_base_norms(  # the norms lorakit recorded on saving: a mismatch means another base
        report.adapter,
        adapter.fingerprint,
        {m.module: norm0},
        base_name=adapter.base_name,
        fix="Pass the base it was trained on.",
        here=f"in {base.path}",
    )
    f: LoraFactors = adapter.factors[m.module]
    delta = f.scale * (f.B.float() @ f.A.float())  # (out, in)
    m.delta_rel = m.spectrum.fro_norm / norm0 if norm0 > 0 else math.nan
    U0 = base_vectors(W0)  # (out, min(out, in)), shared by both intruder counts
    m.intruders = find_intruders(U0, W0 + delta, top_k=report.top_k, threshold=report.threshold)
    if tuned is not None:
        Wt = module_weight(tuned, m.module, m.kind, m.spectrum.shape)
        if Wt is None:
            report.notes.append(f"{tuned.path} has no weight for {m.module}; its full-FT intruders are skipped.")
        else:
            m.intruders_tuned = find_intruders(U0, Wt, top_k=report.top_k, threshold=report.threshold)
    return True
