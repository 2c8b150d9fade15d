"""PNG plots of training runs (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_losses(losses: Sequence[float], file: str | Path, *, title: str = "training loss") -> Path:
    """Loss per step on a log scale, with a moving average when there are many steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.5 if len(losses) > 20 else 1.0, label="loss")
    if len(losses) > 20:
        k = max(2, len(losses) // 20)
        avg = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
        ]
        ax.plot(steps, avg, lw=2, label=f"mean of {k}")
        ax.legend()
    if min(losses, default=1.0) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = file.with_name(f".{file.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(file)
    return file
