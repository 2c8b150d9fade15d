"""PNG plots of an analysis report (matplotlib Agg): few lines per axes, labelled, log scales where σ spans decades.

- ``spectra.png``        singular values of the largest modules (by ‖ΔW‖_F), log scale
- ``energy.png``         energy curve E(k) per module type: median over layers with the min–max band
- ``effective_rank.png``          effective rank and stable rank per layer, one line per module type
- ``intruders.png``      intruder dimensions per layer, stacked by module type (with a base; and the full FT)
- ``overlap.png``        subspace overlap and interference per layer with each compared adapter
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorakit.analysis.report import AnalysisReport, ModuleReport

MAX_SPECTRA = 6  # modules drawn in spectra.png
MAX_TYPES = 8  # module types drawn per axes (the ones with the most parameters)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, file: Path) -> Path:
    """Write through a temp file and one rename, so a crash never leaves a partial PNG."""
    fig.tight_layout()
    tmp = file.with_name(f".{file.stem}.tmp.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    tmp.replace(file)
    return file


def _label(m: ModuleReport) -> str:
    return m.module if m.layer is None else f"layer {m.layer} {m.type}"


def _types(report: AnalysisReport) -> dict[str, list[ModuleReport]]:
    """Module types with a layer index, at most MAX_TYPES, largest parameter count first."""
    groups = {t: [m for m in ms if m.layer is not None] for t, ms in report.by_type().items()}
    ranked = sorted((t for t in groups if groups[t]), key=lambda t: -sum(m.spectrum.params for m in groups[t]))
    return {t: sorted(groups[t], key=lambda m: m.layer or 0) for t in ranked[:MAX_TYPES]}


def plot_spectra(report: AnalysisReport, file: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    largest = sorted(report.modules, key=lambda m: -m.spectrum.fro_norm)[:MAX_SPECTRA]
    for m in largest:
        s = [v for v in m.spectrum.singular_values if v > 0]
        ax.plot(range(1, len(s) + 1), s, marker="o", ms=3, lw=1.5, label=_label(m))
    ax.set_yscale("log")
    ax.set_xlabel("index i (descending)")
    ax.set_ylabel("singular value σᵢ of ΔW")
    ax.set_title(f"ΔW spectra of the {len(largest)} modules with the largest " + r"$\|\Delta W\|_F$")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, file)


def _padded(curve: list[float], k: int) -> list[float]:
    return curve + [curve[-1] if curve else 0.0] * (k - len(curve))


def plot_energy(report: AnalysisReport, file: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    groups = {t: ms for t, ms in report.by_type().items()}
    ranked = sorted(groups, key=lambda t: -sum(m.spectrum.params for m in groups[t]))[:MAX_TYPES]
    k = max(len(m.spectrum.energy) for m in report.modules)
    every = [_padded(m.spectrum.energy, k) for m in report.modules]
    x = range(1, k + 1)
    low, high = ([f(c[i] for c in every) for i in range(k)] for f in (min, max))
    ax.fill_between(x, low, high, color="grey", alpha=0.2, label=f"min–max of all {len(every)} modules")
    for t in ranked:
        curves = [_padded(m.spectrum.energy, k) for m in groups[t]]
        median = [sorted(c[i] for c in curves)[len(curves) // 2] for i in range(k)]
        ax.plot(x, median, marker="o", ms=3, lw=1.5, label=f"{t} (median of {len(curves)})")
    for level in (0.9, 0.99):
        ax.axhline(level, color="grey", ls="--", lw=0.8)
        ax.annotate(f"{level:.0%}", (1, level), xytext=(2, -9), textcoords="offset points", fontsize=7, color="grey")
    ax.set_xlabel("rank k")
    ax.set_ylabel(r"energy kept  $\Sigma_{i\leq k}\,\sigma_i^2 \,/\, \|\Delta W\|_F^2$")
    ax.set_title("Energy curve of ΔW per module type")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, file)


def _heatmap(ax: Any, fig: Any, report: AnalysisReport, value: Callable[[ModuleReport], float], label: str) -> None:
    """Module types (rows) × layers (columns), colour = ``value``; blank where a type lacks a layer."""
    types = _types(report)
    layers = sorted({m.layer for ms in types.values() for m in ms if m.layer is not None})
    col = {layer: i for i, layer in enumerate(layers)}
    grid = [[math.nan] * len(layers) for _ in types]
    for row, ms in enumerate(types.values()):
        for m in ms:
            grid[row][col[m.layer or 0]] = value(m)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_yticks(range(len(types)), list(types))
    step = max(1, len(layers) // 15)
    ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("layer")


def plot_ranks(report: AnalysisReport, file: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
    erank = r"effective rank  $\exp H(\sigma/\Sigma\sigma)$"
    srank = r"stable rank  $\|\Delta W\|_F^2 / \|\Delta W\|_2^2$"
    _heatmap(left, fig, report, lambda m: m.spectrum.effective_rank, erank)
    left.set_title(f"Effective rank of ΔW (Roy & Vetterli; max = r = {_max_rank(report)})")
    _heatmap(right, fig, report, lambda m: m.spectrum.stable_rank, srank)
    right.set_title("Stable rank of ΔW")
    return _save(fig, file)


def _max_rank(report: AnalysisReport) -> str:
    ranks = sorted({m.spectrum.rank for m in report.modules})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


def _stacked(ax: Any, report: AnalysisReport, tuned: bool) -> None:
    bottom: dict[int, int] = {}
    for t, ms in _types(report).items():
        counts: dict[int, int] = {}
        for m in ms:
            found = m.intruders_tuned if tuned else m.intruders
            if found is not None and m.layer is not None:
                counts[m.layer] = counts.get(m.layer, 0) + found.count
        layers = sorted(counts)
        ax.bar(layers, [counts[x] for x in layers], bottom=[bottom.get(x, 0) for x in layers], label=t)
        for x in layers:
            bottom[x] = bottom.get(x, 0) + counts[x]
    if any(bottom.values()):
        ax.legend(fontsize=7, ncols=2)
    else:
        ax.text(0.5, 0.5, "no intruder dimensions", transform=ax.transAxes, ha="center", fontsize=11, color="grey")
    ax.set_xlabel("layer")
    ax.set_ylabel("intruder dimensions")
    ax.set_ylim(0, max([*bottom.values(), 1]) * 1.35 + 0.5)  # headroom for the legend
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="y")


def _cosines(ax: Any, report: AnalysisReport) -> None:
    """Histogram of max |cos| over all tested top-k vectors, with the threshold ε: intruders lie left of it."""
    bins = [i / 40 for i in range(41)]
    sets = [("W0 + ΔW", [c for m in report.modules if m.intruders for c in m.intruders.max_cos])]
    if report.tuned:
        sets.append(("full FT", [c for m in report.modules if m.intruders_tuned for c in m.intruders_tuned.max_cos]))
    for name, values in sets:
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)} vectors)")
    ax.axvline(report.threshold, color="red", ls="--", lw=1.2, label=f"ε = {report.threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)  # single vectors stay visible on the log axis
    ax.set_xlabel("max |cos| of a top-k singular vector of W_ft to W0's singular vectors")
    ax.set_ylabel("singular vectors")
    ax.set_title("How close each top-k direction stays to W0\n(intruders: left of the red line)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_intruders(report: AnalysisReport, file: Path) -> Path:
    plt = _pyplot()
    panels = 3 if report.tuned else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.4), dpi=120)
    rule = f"top-{report.top_k}, max |cos| < {report.threshold:g}"
    _stacked(axes[0], report, tuned=False)
    axes[0].set_title(f"Intruder dimensions of W0 + ΔW per layer\n({rule}; total {report.intruder_total()})")
    if report.tuned:
        _stacked(axes[1], report, tuned=True)
        axes[1].set_title(f"Intruder dimensions of the full fine-tune\n({rule}; total {report.intruder_total(True)})")
    _cosines(axes[-1], report)
    return _save(fig, file)


def plot_overlap(report: AnalysisReport, file: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for c in report.comparisons[:MAX_SPECTRA]:
        for ax, values in ((left, c.overlap), (right, c.interference)):
            layers: dict[int, list[float]] = {}
            for module, v in values.items():
                layer = next((m.layer for m in report.modules if m.module == module), None)
                if layer is not None and v == v:  # v == v drops NaN
                    layers.setdefault(layer, []).append(v)
            xs = sorted(layers)
            ax.plot(xs, [sum(layers[x]) / len(layers[x]) for x in xs], marker="o", ms=3, label=Path(c.other).name)
    left.set_title("Subspace overlap per layer (mean cos² of principal angles)")
    left.set_ylabel("overlap (1 = same column space)")
    right.set_title("Interference per layer  " + r"$\|\Delta W_i^T\Delta W_j\|_F / (\|\Delta W_i\|_F\|\Delta W_j\|_F)$")
    right.set_ylabel("interference")
    for ax in (left, right):
        ax.set_xlabel("layer (mean over the layer's modules)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    return _save(fig, file)


def plot_report(report: AnalysisReport, out: Path) -> list[Path]:
    """Every plot that has data, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_spectra(report, out / "spectra.png"), plot_energy(report, out / "energy.png")]
    if _types(report):
        files.append(plot_ranks(report, out / "effective_rank.png"))
        if report.intruder_total() is not None:
            files.append(plot_intruders(report, out / "intruders.png"))
        if report.comparisons:
            files.append(plot_overlap(report, out / "overlap.png"))
    return files
