"""`lorakit analyze` through typer's CliRunner on a tiny local base checkpoint."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import app
from lorakit.testing import randomize_adapters, tiny_llama

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two random LoRA adapters (different seeds) on tiny_llama(seed=0)."""
    root = tmp_path_factory.mktemp("analyze-cli")
    paths = []
    for seed in (0, 1):
        model = lk.attach(tiny_llama(seed=0), lk.method_config("lora", r=4, alpha=8), targets="all-linear")
        randomize_adapters(model, seed=seed, std=0.2)
        paths.append(lk.save_adapter(model, root / f"adapter{seed}"))
    return paths


def test_analyze_with_base_and_compare_writes_json_and_plots(adapters, tiny_checkpoint, tmp_path):
    a, b = adapters
    out = tmp_path / "analysis"
    result = invoke("analyze", a, "--base", tiny_checkpoint, "--out", out, "--compare", b, "--compare", a)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["base"] == str(tiny_checkpoint) and data["totals"]["modules"] == 14  # 2 layers x 7 projections
    assert data["totals"]["intruders"] == sum(m["intruders"]["count"] for m in data["modules"])
    assert [c["other"] for c in data["compare"]] == [str(b), str(a)]
    assert data["compare"][1]["mean_overlap"] == pytest.approx(1.0)  # with itself
    assert 0.0 <= data["compare"][0]["mean_overlap"] < 1.0
    names = {p.name for p in out.iterdir()}
    assert names == {"analysis.json", "spectra.png", "energy.png", "effective_rank.png", "intruders.png", "overlap.png"}
    assert "q_proj" in result.stdout and "intruders" in result.stdout and f"vs {b}" in result.stdout


def test_analyze_without_base_defaults_to_the_adapter_folder(adapters):
    a, _ = adapters
    result = invoke("analyze", a)
    assert result.exit_code == 0, result.output
    data = json.loads((a / "analysis" / "analysis.json").read_text())
    assert data["totals"]["intruders"] is None and "intruder dimensions skipped" in data["notes"][0]
    assert "intruder dimensions skipped" in result.stdout
    assert not (a / "analysis" / "intruders.png").exists() and (a / "analysis" / "spectra.png").exists()
    assert lk.load_adapter(tiny_llama(seed=0), a) is not None  # the adapter dir still loads


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--threshold", "0"], "threshold"), (["--tuned", "x"], "--tuned needs --base"), (["--base", "/nope"], "/nope")],
)
def test_bad_input_is_one_error_line(adapters, args, message):
    result = invoke("analyze", adapters[0], *args)
    assert result.exit_code == 2 and "error:" in result.output and message in result.output
