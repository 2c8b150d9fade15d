"""The quality gates of `make test` really fail on what they guard against (each shown on a fixture).

`make test` runs `ruff check`, `ruff format --check` and `mypy` before pytest; the size budget,
the README table and the README examples are tests. Here each gate meets one bad input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.cli.readme import END, START, main
from tests.test_layout import over_budget
from tests.test_readme import blocks, cli_commands

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_fails_on_a_lint_error_and_on_bad_formatting(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(x):\n    return x\n")
    lint = _run(str(BIN / "ruff"), "check", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert lint.returncode == 1 and "F401" in lint.stdout
    ugly = tmp_path / "ugly.py"
    ugly.write_text("x = {  'a':1 }\n")
    fmt = _run(str(BIN / "ruff"), "format", "--check", "--config", str(ROOT / "pyproject.toml"), str(ugly))
    assert fmt.returncode == 1 and "would be reformatted" in fmt.stdout


def test_ruff_fails_on_a_too_complex_function(tmp_path):
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(12))
    (tmp_path / "complex.py").write_text(f"def f(x: int) -> int:\n{branches}\n    return -1\n")
    result = _run(str(BIN / "ruff"), "check", "--config", str(ROOT / "pyproject.toml"), str(tmp_path / "complex.py"))
    assert result.returncode == 1 and "C901" in result.stdout


def test_mypy_fails_on_a_type_error_and_a_missing_annotation(tmp_path):
    (tmp_path / "typed.py").write_text("def f(x: int) -> str:\n    return x\n\n\ndef g(y):\n    return y\n")
    result = _run(
        str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / ".mypy"),
        str(tmp_path / "typed.py"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "Incompatible return value type" in result.stdout and "missing a type annotation" in result.stdout


def test_size_budget_names_a_151_line_method_file(tmp_path):
    methods = tmp_path / "methods"
    methods.mkdir()
    (methods / "big.py").write_text("\n".join(f"x{i} = {i}" for i in range(151)) + "\n")
    (methods / "_helper.py").write_text("\n".join(f"x{i} = {i}" for i in range(151)) + "\n")  # helpers: 500
    (tmp_path / "module.py").write_text("\n".join(f"x{i} = {i}" for i in range(501)) + "\n")
    found = over_budget(tmp_path)
    assert found == {"methods/big.py": (151, 150), "module.py": (501, 500)}


def test_stale_methods_table_fails_the_check(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n| stale |\n{END}\n")
    assert main(["--check", str(readme)]) == 1


def test_a_broken_readme_example_fails(tmp_path):
    text = "```bash\nlorakit inspect /no/such/adapter\n```\n```python\nimport lorakit as lk\nlk.attach(None)\n```\n"
    (args,) = cli_commands(text)
    assert CliRunner().invoke(app, args).exit_code != 0
    (code,) = blocks("python", text)
    with pytest.raises(Exception):  # noqa: B017 - any failure of the snippet must surface
        exec(compile(code, "README.md", "exec"), {})
