"""The extraction plot: kept energy against rank for the modules with the largest deltas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_energy(result: Any, path: Path, top: int = 6) -> Path:
    """Cumulative Σσ²/‖ΔW‖² vs rank for the ``top`` modules of largest delta; the chosen ranks are marked."""
    spectra: dict[str, list[float]] = result.spectra
    by_size = sorted(spectra, key=lambda m: -result.modules.get(m, {}).get("params", 0))[:top]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for module in by_size:
        s2 = spectra[module]
        cum, total = [], 0.0
        for v in s2:
            total += v
            cum.append(total)
        (line,) = ax.plot(range(1, len(cum) + 1), cum, label=module, linewidth=1.4)
        info = result.modules.get(module)
        if info:
            ax.plot([info["rank"]], [info["energy"]], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank k (log scale)")
    ax.set_ylabel("energy kept  Σσ²(≤k) / ‖ΔW‖²")
    ax.set_title("Extraction: energy vs rank (dots: chosen rank)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
