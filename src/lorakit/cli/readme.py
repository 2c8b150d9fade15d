"""Render README.md's tables from the registries: ``python -m lorakit.cli.readme [--check] [README]``.

The methods table lives between ``<!-- methods:start -->`` and ``<!-- methods:end -->``; the inits
table between ``<!-- inits:start -->`` / ``<!-- inits:end -->`` and the method contract's hooks between
``<!-- hooks:start -->`` / ``<!-- hooks:end -->`` (both optional). A test checks that the README equals
what this script renders, so a newly registered method or init, or a new hook, shows up after one run.
When ``benchmarks/results/methods.json`` exists (written by ``benchmarks/methods.py``), its
measured training cost per method fills three more columns.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from lorakit.init import INITS
from lorakit.methods import REGISTRY
from lorakit.methods._api import HOOKS, REQUIRED_HOOKS, AdapterModule

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


def inits_table() -> str:
    """The Markdown table of every registered init: the methods and layers it applies to, what it needs."""
    cols = ["Init", "Paper", "Applies to", "Layers", "Reads data", "Residual base", "Identity at init", "Options"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    for spec in sorted(INITS.values(), key=lambda s: s.name):
        options = ", ".join(f"`{f.name}`" for f in dataclasses.fields(spec.options)) or "—"
        cells = [f"`{spec.name}`", f"[{spec.paper}]({spec.url})", ", ".join(f"`{m}`" for m in spec.methods)]
        base = "replaced (rebuilt on load)" if spec.replaces_base else yes(spec.shifts_base)
        cells += [", ".join(spec.layers), yes(spec.calibration), base, yes(spec.identity_at_init)]
        lines.append("| " + " | ".join([*cells, options]) + " |")
    return "\n".join(lines)


def hooks_table() -> str:
    """The method contract (``AdapterModule``): every hook, required or with its default, and its meaning."""
    lines = ["| Hook | | Signature | Meaning |", "| --- | --- | --- | --- |"]
    for name in HOOKS:
        member = inspect.getattr_static(AdapterModule, name)
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if callable(member):
            sig = inspect.signature(member)
            params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
            text = f"{name}{sig.replace(parameters=params)}".replace("'", "")
            kind = "classmethod " if isinstance(inspect.getattr_static(AdapterModule, name), classmethod) else ""
            sig_text, doc = f"{kind}`{text}`", inspect.getdoc(member) or ""
        else:
            sig_text, doc = f"`{name}` (class attribute)", _attribute_doc(name)
        meaning = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")
        lines.append(f"| `{name}` | {'required' if name in REQUIRED_HOOKS else 'optional'} | {sig_text} | {meaning} |")
    return "\n".join(lines)


def _attribute_doc(name: str) -> str:
    """The docstring written under a class attribute of AdapterModule (the line after its definition)."""
    source = inspect.getsource(AdapterModule).splitlines()
    for i, line in enumerate(source):
        if line.strip().startswith(f"{name}:") and i + 1 < len(source) and '"""' in source[i + 1]:
            return source[i + 1].strip().strip('"')
    return ""


BLOCKS = {"methods": methods_table, "inits": inits_table, "hooks": hooks_table}


def render(text: str) -> str:
    """``text`` with each block between its markers replaced by the current table (the methods one is required)."""
    if START not in text or END not in text:
        raise ValueError(f"the README needs the markers {START} and {END} around the methods table")
    for name, table in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, found, rest = text.partition(start)
        _, closed, tail = rest.partition(end)
        if found and closed:
            text = f"{head}{start}\n{table()}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    readme = Path(paths[0] if paths else "README.md")
    old = readme.read_text()
    new = render(old)
    if check:
        if new != old:
            print(f"{readme}: the generated tables are out of date; run `python -m lorakit.cli.readme`.")
            return 1
        return 0
    readme.write_text(new)
    print(f"{readme}: generated tables {'updated' if new != old else 'already up to date'}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
