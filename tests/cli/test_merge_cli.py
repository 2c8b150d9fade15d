"""`lorakit merge` through typer's CliRunner: flags, --config YAML, errors and --into-base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.io.factors import read_factors
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

runner = CliRunner()


def invoke(*args):
    """``lorakit merge ARGS...``"""
    return runner.invoke(app, ["merge", *(str(a) for a in args)])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = []
    for name, seed, r in (("a", 1, 4), ("b", 2, 2)):
        model = tiny_llama(0)
        torch.manual_seed(seed)
        lk.attach(model, lk.method_config("lora", r=r, alpha=8), targets="all-linear")
        randomize_adapters(model, seed=seed)
        out.append(lk.save_adapter(model, root / name))
    return out


def same_adapter(a, b) -> None:
    fa, fb = read_factors(a), read_factors(b)
    assert fa.ranks() == fb.ranks()
    for m in fa.factors:
        torch.testing.assert_close(fa.delta(m), fb.delta(m), rtol=0, atol=0)


def test_flags_give_the_python_api_result(dirs, tmp_path):
    result = invoke(
        *dirs, "--method", "ties", "--weights", "1,0.5", "--density", "0.5", "--rank", "3", "--out", tmp_path / "cli"
    )
    assert result.exit_code == 0, result.output
    assert "merged 2 adapter(s) with ties: 14 modules" in result.stdout
    api = lk.merge_adapters(dirs, method="ties", weights=[1, 0.5], density=0.5, rank=3, out=tmp_path / "api")
    same_adapter(tmp_path / "cli", api)
    assert set(read_factors(api).ranks().values()) == {3}


def test_config_yaml_gives_the_same_merge_and_flags_override_it(dirs, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"adapters: [{dirs[0]}, {dirs[1]}]\nmethod: dare_linear\nweights: [2, -1]\n"
        "density: 0.7\nseed: 3\nout: from-yaml\n"
    )
    result = invoke("--config", cfg)
    assert result.exit_code == 0, result.output
    api = lk.merge_adapters(dirs, method="dare_linear", weights=[2, -1], density=0.7, seed=3, out=tmp_path / "api")
    same_adapter(tmp_path / "from-yaml", api)  # out: is relative to the config file
    result = invoke("--config", cfg, "--method", "linear", "--out", tmp_path / "override")
    assert result.exit_code == 2 and "has no option(s) density" in result.output  # YAML density + --method linear
    cfg.write_text(f"adapters: [{dirs[0]}, {dirs[1]}]\nweights: 1,3\nout: lin\n")
    assert invoke("--config", cfg).exit_code == 0
    same_adapter(tmp_path / "lin", lk.merge_adapters(dirs, weights=[1, 3], out=tmp_path / "lin-api"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "1,2,3"], "got 3 weight(s) for 2 adapter(s)"),
        (["--weights", "1,x"], "weights must be numbers"),
        (["--method", "slerp"], "unknown merge method 'slerp'"),
        (["--method", "ties", "--density", "0"], "density must be in (0, 1]"),
        (["--method", "svd", "--rank", "100"], "rank 100 is larger than module"),
        (["--missing", "drop"], "missing must be one of error, zero"),
    ],
)
def test_bad_input_is_one_error_line(dirs, tmp_path, args, message):
    result = invoke(*dirs, *args, "--out", tmp_path / "m")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert not (tmp_path / "m").exists()


def test_bad_config_and_missing_arguments(dirs, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("adapters: [a]\nmethods: ties\n")
    result = invoke("--config", cfg)
    assert result.exit_code == 2 and "unknown field(s) methods" in result.output
    assert "give the adapter dirs" in invoke("--out", tmp_path / "m").output
    assert "--out" in invoke(*dirs).output
    assert "needs --base" in invoke("--into-base", "--adapter", dirs[0]).output


def test_into_base_writes_a_checkpoint_with_the_adapted_logits(dirs, tiny_checkpoint, tmp_path):
    out = tmp_path / "model"
    result = invoke(
        "--into-base", "--base", tiny_checkpoint, "--adapter", dirs[0], "--out", out, "--max-shard-size", "200KB"
    )
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = lk.load_adapter(lk.load_base(str(tiny_checkpoint))[0], dirs[0])
    base = lk.load_base(str(tiny_checkpoint))[0]
    x = tokens()
    torch.testing.assert_close(logits(merged, x), logits(adapted, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(merged, x), logits(base, x), atol=1e-3)  # the adapter changed the model


def test_help_comes_from_the_docstring():
    result = invoke("--help")
    assert result.exit_code == 0
    for text in ("Merge LoRA adapters into one adapter", "--into-base", "--config", "ortho_dropout"):
        assert text in result.stdout
