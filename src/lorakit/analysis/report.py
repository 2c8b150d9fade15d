"""The result of ``lk.analyze``: per-module statistics, comparisons, and their JSON, text and PNG forms."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.analysis.intruders import Intruders
from lorakit.analysis.overlap import Comparison
from lorakit.analysis.spectra import Spectrum
from lorakit.io.atomic import atomic_dir

JSON_NAME = "analysis.json"


def layer_of(module: str) -> int | None:
    """The block index of a module name (``model.layers.12.mlp.up_proj`` -> 12), None outside the blocks."""
    found = re.search(r"\.(\d+)\.", f".{module}.")
    return int(found.group(1)) if found else None


def type_of(module: str) -> str:
    """The module's own name (``model.layers.12.mlp.up_proj`` -> ``up_proj``)."""
    return module.rsplit(".", 1)[-1]


@dataclass
class ModuleReport:
    """Everything measured on one adapted module."""

    module: str
    kind: str  # "linear" | "conv1d" | "embedding"
    spectrum: Spectrum
    delta_rel: float | None = None  # ‖ΔW‖_F / ‖W0‖_F (with a base)
    intruders: Intruders | None = None  # of W0 + ΔW (with a base)
    intruders_tuned: Intruders | None = None  # of the full fine-tuned weight (with --tuned)

    @property
    def layer(self) -> int | None:
        return layer_of(self.module)

    @property
    def type(self) -> str:
        return type_of(self.module)


@dataclass
class AnalysisReport:
    """Spectra, ranks, intruder dimensions and overlaps of one adapter."""

    adapter: str
    modules: list[ModuleReport]
    base: str | None = None
    tuned: str | None = None
    top_k: int = 10
    threshold: float = 0.5
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_type(self) -> dict[str, list[ModuleReport]]:
        """The modules grouped by their type (q_proj, v_proj, ...), in order."""
        return by_type(self.modules)

    def module(self, name: str) -> ModuleReport:
        return next(m for m in self.modules if m.module == name)

    @property
    def params(self) -> int:
        return sum(m.spectrum.params for m in self.modules)

    def intruder_total(self, tuned: bool = False) -> int | None:
        found = [m.intruders_tuned if tuned else m.intruders for m in self.modules]
        counted = [i.count for i in found if i is not None]
        return sum(counted) if counted else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (NaN becomes null)."""
        data = {
            "adapter": self.adapter,
            "base": self.base,
            "tuned": self.tuned,
            "intruder_settings": {"top_k": self.top_k, "threshold": self.threshold},
            "totals": {
                "modules": len(self.modules),
                "params": self.params,
                "intruders": self.intruder_total(),
                "intruders_tuned": self.intruder_total(tuned=True),
            },
            "notes": list(self.notes),
            "modules": [_module_dict(m) for m in self.modules],
            "compare": [_comparison_dict(c) for c in self.comparisons],
        }
        return _finite(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """A short human-readable summary: one row per module type, the largest modules, comparisons, notes."""
        lines = [f"adapter {self.adapter}: {len(self.modules)} modules, {self.params:,} parameters"]
        if self.base:
            lines.append(
                f"base {self.base}: intruders = top-{self.top_k} singular vectors of W0+ΔW with max |cos| < "
                f"{self.threshold:g} to every singular vector of W0" + (f"; full FT {self.tuned}" if self.tuned else "")
            )
        lines += ["", *_type_table(self), ""]
        largest = sorted(self.modules, key=lambda m: -m.spectrum.fro_norm)[:5]
        lines.append("largest ‖ΔW‖_F: " + ", ".join(f"{m.module} ({m.spectrum.fro_norm:.3g})" for m in largest))
        for c in self.comparisons:
            unshared = f" ({len(c.only_here)} only here, {len(c.only_there)} only there)"
            lines.append(
                f"vs {c.other}: mean subspace overlap {c.mean_overlap:.3f}, mean interference "
                f"{c.mean_interference:.3f} over {len(c.overlap)} shared modules"
                + (unshared if c.only_here or c.only_there else "")
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, out: str | Path) -> list[Path]:
        """Write the PNG plots into ``out`` (created if needed); returns their paths."""
        from lorakit.analysis.plots import plot_report

        return plot_report(self, Path(out))

    def save(self, out: str | Path, *, plots: bool = True) -> Path:
        """Write ``analysis.json`` (and the plots) into ``out`` in one atomic step."""
        with atomic_dir(out, marker=JSON_NAME) as tmp:
            (tmp / JSON_NAME).write_text(self.to_json() + "\n")
            if plots:
                self.plot(tmp)
        return Path(out)


def _module_dict(m: ModuleReport) -> dict[str, Any]:
    s = dataclasses.asdict(m.spectrum)
    s["shape"] = list(m.spectrum.shape)
    return {
        "module": m.module,
        "kind": m.kind,
        "layer": m.layer,
        **s,
        "delta_rel": m.delta_rel,
        "intruders": dataclasses.asdict(m.intruders) if m.intruders else None,
        "intruders_tuned": dataclasses.asdict(m.intruders_tuned) if m.intruders_tuned else None,
    }


def _comparison_dict(c: Comparison) -> dict[str, Any]:
    return {
        "other": c.other,
        "mean_overlap": c.mean_overlap,
        "mean_interference": c.mean_interference,
        "modules": [{"module": m, "overlap": c.overlap[m], "interference": c.interference[m]} for m in c.overlap],
        "only_in_adapter": c.only_here,
        "only_in_other": c.only_there,
    }


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _type_table(report: AnalysisReport) -> list[str]:
    """Fixed-width rows of per-type means (sums for parameters and intruders)."""
    cols = ["type", "modules", "rank", "params", "eff.rank", "stable", "k@90%", "‖ΔW‖_F"]
    with_base = report.base is not None
    cols += ["‖ΔW‖/‖W0‖", "intruders"] if with_base else []
    cols += ["FT intruders"] if report.tuned else []
    rows = [cols]
    for name, group in by_type(report.modules).items():
        ranks = sorted({m.spectrum.rank for m in group})
        row = [
            name,
            str(len(group)),
            str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
            f"{sum(m.spectrum.params for m in group):,}",
            f"{_avg(m.spectrum.effective_rank for m in group):.2f}",
            f"{_avg(m.spectrum.stable_rank for m in group):.2f}",
            f"{_avg(m.spectrum.rank_90 for m in group):.1f}",
            f"{_avg(m.spectrum.fro_norm for m in group):.3g}",
        ]
        if with_base:
            row += [f"{_avg(m.delta_rel for m in group):.3g}", _count(m.intruders for m in group)]
        if report.tuned:
            row.append(_count(m.intruders_tuned for m in group))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    pad = [str.ljust] + [str.rjust] * (len(cols) - 1)
    return ["  ".join(p(c, w) for p, c, w in zip(pad, r, widths, strict=True)) for r in rows]


def _avg(values: Iterable[float | None]) -> float:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return sum(known) / len(known) if known else math.nan


def _count(found: Iterable[Intruders | None]) -> str:
    counts = [i.count for i in found if i is not None]
    return str(sum(counts)) if counts else "-"


def by_type(modules: list[ModuleReport]) -> dict[str, list[ModuleReport]]:
    """Modules grouped by their own name, in first-seen order."""
    groups: dict[str, list[ModuleReport]] = defaultdict(list)
    for m in modules:
        groups[m.type].append(m)
    return dict(groups)
