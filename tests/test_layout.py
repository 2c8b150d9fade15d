"""Size is a property we check: method files ≤150 non-blank lines, every module ≤500."""

from pathlib import Path

import pytest

import lorakit

SRC = Path(lorakit.__file__).parent


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_module_size(path):
    limit = 150 if path.parent.name == "methods" and not path.name.startswith("_") else 500
    assert _lines(path) <= limit, f"{path} has {_lines(path)} non-blank lines (limit {limit})"


def test_every_method_file_registers_and_names_its_paper():
    registered_files = {spec.adapter.__module__.rsplit(".", 1)[-1] for spec in lorakit.REGISTRY.values()}
    files = {p.stem for p in (SRC / "methods").glob("*.py") if not p.name.startswith("_")}
    assert files <= registered_files, f"method files that register nothing: {files - registered_files}"
    for spec in lorakit.REGISTRY.values():
        doc = __import__(spec.adapter.__module__, fromlist=["x"]).__doc__ or ""
        assert spec.url in doc.splitlines()[0], f"{spec.name}: first docstring line must give the paper link"
