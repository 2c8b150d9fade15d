"""`lorakit extract` and `lorakit resize` end to end on tiny checkpoints."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.io.factors import read_factors
from lorakit.testing import randomize_adapters, save_tuned_pair, tiny_llama

runner = CliRunner()


def test_extract_then_resize(tmp_path):
    save_tuned_pair(tmp_path, tiny_llama, seed=2)
    args = [
        "extract",
        "--base",
        str(tmp_path / "base"),
        "--tuned",
        str(tmp_path / "tuned"),
        "--out",
        str(tmp_path / "a"),
    ]
    result = runner.invoke(app, [*args, "--energy", "0.5", "--max-rank", "6", "--targets", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    assert "LoRA modules" in result.output and "saved whole: model.norm" in result.output
    report = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    assert set(report["modules"]) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    assert all(1 <= m["rank"] <= 6 and m["energy"] >= 0.5 or m["rank"] == 6 for m in report["modules"].values())
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    result = runner.invoke(app, ["resize", str(tmp_path / "a"), "--out", str(tmp_path / "r"), "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert set(read_factors(tmp_path / "r").ranks().values()) == {2}
    assert runner.invoke(app, ["resize", str(tmp_path / "a"), "--out", str(tmp_path / "r2")]).exit_code == 2


def test_resize_nested_keeps_the_first_components(tmp_path):
    """--nested: DyLoRA's truncation (train/callbacks/dylora.truncate), no SVD."""
    model = lk.attach(tiny_llama(0), lk.method_config("lora", r=4), targets=["q_proj"])
    randomize_adapters(model, seed=1)
    lk.save_adapter(model, tmp_path / "a")
    result = runner.invoke(
        app, ["resize", str(tmp_path / "a"), "--out", str(tmp_path / "r"), "--rank", "2", "--nested"]
    )
    assert result.exit_code == 0, result.output
    full, cut = read_factors(tmp_path / "a").factors, read_factors(tmp_path / "r").factors
    assert full.keys() == cut.keys()
    for m, f in cut.items():  # the first two components, at scale α/2
        assert f.A.equal(full[m].A[:2]) and f.B.equal(full[m].B[:, :2]) and f.scale == full[m].scale * 2
    bad = runner.invoke(
        app, ["resize", str(tmp_path / "a"), "--out", str(tmp_path / "x"), "--energy", "0.5", "--nested"]
    )
    assert bad.exit_code == 2 and "--nested takes --rank R alone" in bad.output


def test_help_of_both_verbs():
    for verb in ("extract", "resize"):
        result = runner.invoke(app, [verb, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
