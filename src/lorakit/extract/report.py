"""The extraction plot: kept energy against rank for the modules with the largest deltas.

Importing matplotlib takes ~0.3 s and drawing ~0.2 s, a sixth of a whole extraction, so
:class:`PlotJob` keeps both off its critical path: when this process has not loaded matplotlib
yet, a helper process (``python -c ...``, sharing nothing with this one) imports it meanwhile
(the CLI starts it before importing torch: :func:`prestart`) and draws the curves it is sent as
soon as the largest modules are known, usually long before the extraction ends. When
matplotlib is already loaded (a notebook, a test session), the plot is drawn here. This module
imports neither matplotlib nor torch, so the helper starts light.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

Curve = dict[str, Any]  # {"module", "cum": energy kept at rank 1, 2, ..., "rank", "energy"} (rank/energy may be None)
_HELPER = "from lorakit.extract.report import _helper; _helper()"


def largest(result: Any, top: int = 6) -> list[str]:
    """The ``top`` modules of largest delta (most LoRA parameters; the first factored among equals)."""
    return sorted(result.spectra, key=lambda m: -result.modules.get(m, {}).get("params", 0))[:top]


def curves(result: Any, top: int = 6) -> list[Curve]:
    """Cumulative Σσ²/‖ΔW‖² per rank for the ``top`` modules of largest delta, with their chosen rank."""
    spectra: dict[str, list[float]] = result.spectra
    out = []
    for module in largest(result, top):
        cum, total = [], 0.0
        for v in spectra[module]:
            total += v
            cum.append(total)
        info = result.modules.get(module) or {}
        out.append({"module": module, "cum": cum, "rank": info.get("rank"), "energy": info.get("energy")})
    return out


def draw(lines: list[Curve], path: Path) -> Path:
    """Draw ``lines`` (from :func:`curves`) into the PNG ``path``; the chosen ranks are dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in lines:
        (line,) = ax.plot(range(1, len(c["cum"]) + 1), c["cum"], label=c["module"], linewidth=1.4)
        if c["rank"] is not None:
            ax.plot([c["rank"]], [c["energy"]], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank k (log scale)")
    ax.set_ylabel("energy kept  Σσ²(≤k) / ‖ΔW‖²")
    ax.set_title("Extraction: energy vs rank (dots: chosen rank)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_energy(result: Any, path: Path, top: int = 6) -> Path:
    """Cumulative Σσ²/‖ΔW‖² vs rank for the ``top`` modules of largest delta; the chosen ranks are marked."""
    return draw(curves(result, top), path)


def _helper() -> None:
    """The helper process: import matplotlib, then draw the newest job on stdin whenever it is idle.

    Each stdin line is a whole job (lines and path): the parent sends one whenever the set of
    largest modules changes, so the plot is usually drawn, final, while the extraction still
    runs. At end of input the newest job is drawn if it was not yet; no job at all: no plot.
    """
    import select

    _warm_up()
    newest: dict[str, Any] | None = None
    drawn: dict[str, Any] | None = None
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        newest = json.loads(line)
        if not select.select([stdin], [], [], 0)[0]:  # nothing newer waiting: draw this one now
            draw(newest["lines"], Path(newest["path"]))
            drawn = newest
    if newest is not None and newest is not drawn:
        draw(newest["lines"], Path(newest["path"]))


def _warm_up() -> None:
    """Load matplotlib and its fonts (the first drawing of a process is ~40 ms slower than the next)."""
    import io

    draw([{"module": "m", "cum": [0.5, 1.0], "rank": 1, "energy": 0.5}], io.BytesIO())  # type: ignore[arg-type]


_spare: list[subprocess.Popen[bytes]] = []  # a helper started ahead by prestart(), for the next PlotJob


def _spawn() -> subprocess.Popen[bytes] | None:
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C stops the extraction, which stops the helper
        )
    except OSError:  # no interpreter to start: draw here instead
        return None


def prestart() -> None:
    """Start the next plot's helper now (the CLI calls it before importing torch, on an idle core)."""
    if not _spare and "matplotlib.figure" not in sys.modules and (proc := _spawn()) is not None:
        _spare.append(proc)


class PlotJob:
    """``with PlotJob(on, path) as p: ...; p.update(result) ...; p.finish(result); ...; p.wait()``.

    ``update`` (after each factored module) hands the helper the plot's data whenever the set of
    largest modules changes; ``finish`` hands over the final data; ``wait`` returns once the PNG
    is written (or raises why not). With ``on=False`` or no spectra, nothing is drawn. Leaving
    the context early (an error) stops the helper.
    """

    def __init__(self, on: bool, path: Path):
        self.on, self.path = on, path
        self.proc: subprocess.Popen[bytes] | None = None
        self.sent: list[str] = []  # the modules of the last job sent
        self.final: list[Curve] = []

    def __enter__(self) -> PlotJob:
        spare = _spare.pop() if _spare else None
        if self.on and "matplotlib.figure" not in sys.modules:
            self.proc = spare or _spawn()
        elif spare is not None:  # not needed: let it go
            self._stop(spare)
        return self

    def update(self, result: Any) -> None:
        if self.proc is not None and (chosen := largest(result)) != self.sent:
            self.sent = chosen
            self._send(json.dumps({"lines": curves(result), "path": str(self.path)}).encode() + b"\n")

    def _send(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # the helper died; wait() says why
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def finish(self, result: Any) -> None:
        if self.on and result.spectra:
            self.final = curves(result)
        if self.proc is not None:
            if self.final:
                self.update(result)
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):  # the helper died; wait() says why
                self.proc.stdin.close()

    def wait(self) -> None:
        if self.proc is None:
            if self.final:
                draw(self.final, self.path)
            return
        assert self.proc.stderr is not None
        error = self.proc.stderr.read().decode(errors="replace")
        if self.proc.wait() != 0:
            raise RuntimeError(f"drawing {self.path} failed:\n{error[-3000:]}")

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self._stop(self.proc)  # still running only after an error: a finished job was waited for
