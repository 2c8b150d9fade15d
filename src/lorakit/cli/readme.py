"""Render README.md's methods table from REGISTRY: ``python -m lorakit.cli.readme [--check] [README]``.

The table lives between ``<!-- methods:start -->`` and ``<!-- methods:end -->``; a test checks
that it equals what this script renders, so a newly registered method shows up after one run.
When ``benchmarks/results/methods.json`` exists (written by ``benchmarks/methods.py``), its
measured training cost per method fills three more columns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lorakit.methods import REGISTRY

START, END = "<!-- methods:start -->", "<!-- methods:end -->"
BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "methods.json"


FAMILIES = {
    "F1": "core LoRA & scaling",
    "F2": "structured parametrizations",
    "F3": "initialization",
    "F4": "training dynamics & optimizers",
    "F5": "rank allocation & placement",
    "F6": "sparse & selective",
    "F7": "other adapter architectures",
    "F8": "quantization-aware",
    "F9": "mixtures & routing",
}


def bench_rows(path: Path = BENCH) -> dict[str, dict[str, Any]]:
    """Per-method measurements of benchmarks/methods.py, or {} when it has not been run."""
    if not path.is_file():
        return {}
    return {row["method"]: row for row in json.loads(path.read_text())["methods"] if "error" not in row}


def methods_table(bench: dict[str, dict[str, Any]] | None = None) -> str:
    """The Markdown table of every registered method: name, paper, family, parameters, mergeable, PEFT.

    With ``bench`` (default: the committed benchmark results), also the trainable parameters on
    the SmolLM2 shape, training tokens/s and the speed ratio to PEFT.
    """
    bench = bench_rows() if bench is None else bench
    cols = ["Method", "Paper", "Family", "Trainable parameters per layer", "Mergeable", "PEFT-compatible"]
    if bench:
        cols += ["Params, SmolLM2 6L", "Train tok/s", "vs PEFT"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for spec in sorted(REGISTRY.values(), key=lambda s: s.name):
        family = f"{spec.family} {FAMILIES.get(spec.family, '')}".strip()
        peft = f"yes (`{spec.adapter.peft_type}`)" if spec.adapter.peft_type else "no (lorakit block)"
        cells = [f"`{spec.name}`", f"[{spec.paper}]({spec.url})", family, f"`{spec.params}`"]
        cells += ["yes" if spec.mergeable else "no", peft]
        if bench:
            row = bench.get(spec.name, {})
            ratio = row.get("ratio_vs_peft")
            cells += [
                f"{row['trainable_params']:,}" if row else "—",
                f"{row['lorakit_tokens_per_s']:.0f}" if row else "—",
                f"{ratio:.2f}×" if ratio else "—",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table."""
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the README needs the markers {START} and {END} around the methods table")
    return f"{head}{START}\n{methods_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    readme = Path(paths[0] if paths else "README.md")
    old = readme.read_text()
    new = render(old)
    if check:
        if new != old:
            print(f"{readme}: the methods table is out of date; run `python -m lorakit.cli.readme`.")
            return 1
        return 0
    readme.write_text(new)
    print(f"{readme}: methods table {'updated' if new != old else 'already up to date'}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
