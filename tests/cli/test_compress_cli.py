"""`lorakit compress` through typer's CliRunner: the table, the sizes, the same result as the Python API, errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.compose.compress import compress
from lorakit.io.collection import Collection
from lorakit.testing import randomize_adapters, tiny_llama

runner = CliRunner()


def invoke(*args):
    """``lorakit compress ARGS...``"""
    return runner.invoke(app, ["compress", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for name, seed, r in (("math", 1, 4), ("code", 2, 2), ("chat", 3, 8)):
        model = tiny_llama(0)
        torch.manual_seed(seed)
        lk.attach(model, lk.method_config("lora", r=r, alpha=8), targets="all-linear")
        randomize_adapters(model, seed=seed)
        out.append(lk.save_adapter(model, root / name))
    return out


def test_prints_errors_and_sizes_and_equals_the_api(dirs, tmp_path):
    result = invoke(*dirs, "--out", tmp_path / "cli", "--rank", "6", "--iters", "2")
    assert result.exit_code == 0, result.output
    api = compress(dirs, tmp_path / "api", rank=6, iters=2)
    for name, error in api.errors.items():
        assert name in result.stdout and f"{error:.3e}" in result.stdout
    assert f"{api.ratio:.2f}x smaller" in result.stdout and "collection" in result.stdout
    cli, ref = Collection.load(tmp_path / "cli"), Collection.load(api.path)
    assert cli.names == ["math", "code", "chat"]
    for m, tensors in ref.modules().items():
        for a, b in zip(cli.modules()[m], tensors, strict=True):
            assert torch.equal(a, b)


def test_names_and_overwrite(dirs, tmp_path):
    assert invoke(*dirs, "--out", tmp_path / "c", "--rank", "2", "--names", "x,y,z").exit_code == 0
    assert Collection.load(tmp_path / "c").names == ["x", "y", "z"]
    again = invoke(*dirs, "--out", tmp_path / "c", "--rank", "3")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert invoke(*dirs, "--out", tmp_path / "c", "--rank", "3", "--overwrite").exit_code == 0
    assert Collection.load(tmp_path / "c").rank == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--rank", "40"], "rank 40 is larger than module"),
        (["--rank", "0"], "rank must be a positive integer"),
        (["--rank", "2", "--names", "a,b"], "got 2 name(s) for 3 adapter(s)"),
    ],
)
def test_errors_are_one_line(dirs, tmp_path, args, message):
    result = invoke(*dirs, "--out", tmp_path / "c", *args)
    assert result.exit_code == 2 and "error:" in result.output
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_one_adapter_and_help(dirs, tmp_path):
    result = invoke(dirs[0], "--out", tmp_path / "c", "--rank", "2")
    assert result.exit_code == 2 and "at least 2 adapters" in result.output
    help_text = invoke("--help").output
    assert "Fit a shared basis per module" in help_text and "--iters" in help_text
