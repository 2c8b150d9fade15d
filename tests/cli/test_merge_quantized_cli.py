"""`lorakit merge --into-base --quantize KIND`: a merge onto a quantized base, its checkpoint and drift.json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit import layers as L
from lorakit.cli import app
from lorakit.compose.into_base import CALIBRATION_TEXT, calibration_ids
from lorakit.quant import merge_drift, quantized_kinds
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

pytest.importorskip("bitsandbytes")
runner = CliRunner()
KEYS = {"mode", "drift", "relative", "max_abs_logit", "kl", "threshold", "reload_change"}
TEXT = "Tuesday: the committee met. Wednesday: it rained.\nQ: 2 + 2? A: 4.\n"


def invoke(*args):
    return runner.invoke(app, ["merge", "--into-base", *(str(a) for a in args)])


def qlora(base, folder, kind="nf4", std=0.05):
    """A randomized LoRA on ``base`` quantized as ``kind`` (stands in for a trained QLoRA)."""
    model = lk.load_base(str(base), quantize=kind)[0]
    lk.attach(model, lk.method_config("lora", r=4, alpha=8), targets="all-linear")
    randomize_adapters(model, seed=1, std=std)
    return lk.save_adapter(model, folder)


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return qlora(tiny_checkpoint, tmp_path_factory.mktemp("qlora") / "nf4")


def unmerged(base, adapter, kind="nf4"):
    """(the adapter on the quantized base, its tokenizer): what the merge is measured against."""
    model, tok = lk.load_base(str(base), quantize=kind)
    return lk.load_adapter(model, adapter), tok


def test_requantize_writes_the_merge_and_the_python_report(tiny_checkpoint, adapter, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "merged"
    result = invoke(
        "--base", tiny_checkpoint, "--adapter", adapter, "--out", out, "--quantize", "nf4",
        "--calibration", tmp_path / "calib.txt",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "merge drift (requantize onto nf4): 14 layers, 0 over 0.5" in text
    assert "all 14 layers (total, median)" in text and "max |Δlogit|" in text
    assert "by at most 0 (the same quantized weights)" in text
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    saved = json.loads((out / "drift.json").read_text())
    assert set(saved) == KEYS and saved["mode"] == "requantize" and saved["reload_change"] == 0
    model, tok = unmerged(tiny_checkpoint, adapter)
    merged = lk.merge(model, calibration=calibration_ids(tok, TEXT))  # the same merge in Python
    report = merge_drift(merged)
    assert set(saved["drift"]) == set(report.drift) and len(report.drift) == 14
    for name, drift in report.drift.items():
        assert saved["drift"][name] == pytest.approx(drift, rel=1e-6)
        assert saved["relative"][name] == pytest.approx(report.relative[name], rel=1e-6)
    assert saved["max_abs_logit"] == pytest.approx(report.max_abs_logit, rel=1e-5) and saved["max_abs_logit"] > 0
    assert saved["kl"] == pytest.approx(report.kl, rel=1e-4) and saved["kl"] > 0
    # on disk: float values of W_merged_q; reloading with --quantize nf4 gives back the very same NF4 layers
    reloaded = lk.load_base(str(out), quantize="nf4")[0]
    layers = {n: m for n, m in merged.named_modules() if L.is_quantized(m)}
    again = {n: m for n, m in reloaded.named_modules() if L.is_quantized(m)}
    assert set(again) == set(layers) and len(layers) == 14
    for name, layer in layers.items():
        assert torch.equal(again[name].weight.data, layer.weight.data)  # the packed NF4 bytes
        assert torch.equal(again[name].weight.quant_state.absmax, layer.weight.quant_state.absmax)
    x = tokens()
    assert torch.equal(logits(reloaded, x), logits(merged, x))
    plain = lk.load_base(str(out))[0]  # without --quantize: the same values, dense
    torch.testing.assert_close(logits(plain, x), logits(merged, x), atol=1e-5, rtol=1e-5)


def test_dequantize_reloads_to_the_unmerged_adapter(tiny_checkpoint, adapter, tmp_path):
    out = tmp_path / "dense"
    result = invoke(
        "--base", tiny_checkpoint, "--adapter", adapter, "--out", out, "--quantize", "nf4", "--quantized", "dequantize"
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "drift.json").read_text())
    assert saved["mode"] == "dequantize" and saved["reload_change"] is None
    assert max(saved["drift"].values()) < 1e-5 and saved["max_abs_logit"] < 1e-4
    model, _ = unmerged(tiny_checkpoint, adapter)
    reloaded = lk.load_base(str(out))[0]  # a plain float checkpoint: W_q + ΔW
    assert quantized_kinds(reloaded) == set()
    x = tokens()
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), atol=1e-4, rtol=1e-4)  # stated tolerance
    base = lk.load_base(str(tiny_checkpoint), quantize="nf4")[0]
    assert not torch.allclose(logits(reloaded, x), logits(base, x), atol=1e-3)  # the adapter is in it


def test_the_default_calibration_batch_is_the_built_in_text(tiny_checkpoint, adapter, tmp_path):
    result = invoke("--base", tiny_checkpoint, "--adapter", adapter, "--out", tmp_path / "m", "--quantize", "nf4")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "m" / "drift.json").read_text())
    model, tok = unmerged(tiny_checkpoint, adapter)
    report = merge_drift(lk.merge(model, calibration=calibration_ids(tok, CALIBRATION_TEXT)))
    assert saved["max_abs_logit"] == pytest.approx(report.max_abs_logit, rel=1e-5)


def test_a_full_precision_merge_over_it_leaves_no_stale_report(tiny_checkpoint, adapter, tmp_path):
    out = tmp_path / "m"
    assert invoke("--base", tiny_checkpoint, "--adapter", adapter, "--out", out, "--quantize", "nf4").exit_code == 0
    assert (out / "drift.json").is_file()
    result = invoke("--base", tiny_checkpoint, "--adapter", adapter, "--out", out)  # onto the float base this time
    assert result.exit_code == 0 and "merge drift" not in result.stdout, result.output
    assert (out / "config.json").is_file() and not (out / "drift.json").exists()


def test_a_drift_over_the_threshold_warns_and_names_the_layers(tiny_checkpoint, tmp_path):
    small = qlora(tiny_checkpoint, tmp_path / "small", std=1e-4)  # far below NF4's step: re-quantizing loses it
    result = invoke("--base", tiny_checkpoint, "--adapter", small, "--out", tmp_path / "m", "--quantize", "nf4")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: merging onto the quantized base lost more than 0.5·‖ΔW‖" in text
    assert "model.layers.0.self_attn.q_proj" in text and "quantized='dequantize'" in text
    assert "14 layers, 14 over 0.5·‖ΔW‖" in text
    result = invoke(
        "--base", tiny_checkpoint, "--adapter", small, "--out", tmp_path / "m2", "--quantize", "nf4",
        "--drift-threshold", "1e9",
    )  # fmt: skip
    assert result.exit_code == 0 and "warning:" not in result.output, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quantize", "nf5"], "unknown quantization kind 'nf5'. Did you mean 'nf4'"),
        (["--quantize", "int4g"], "was trained on a base quantized as bnb4bit, but --quantize gives intgroup"),
        (["--quantize", "nf4", "--quantized", "fp16"], "quantized must be one of requantize, dequantize"),
        (["--quantized", "dequantize"], "--quantized and --calibration apply to a quantized base"),
        (["--quantize", "nf4", "--calibration", "no-such-file.txt"], "cannot read the --calibration text file"),
    ],
)
def test_bad_input_is_one_error_line(tiny_checkpoint, adapter, tmp_path, args, message):
    result = invoke("--base", tiny_checkpoint, "--adapter", adapter, "--out", tmp_path / "m", *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "m").exists()


def test_an_adapter_for_another_base_is_refused(tiny_checkpoint, tmp_path):
    other = lk.attach(lk.quantize(tiny_llama(seed=5), "nf4"), lk.method_config("lora", r=2))
    lk.save_adapter(other, tmp_path / "other")
    result = invoke(
        "--base", tiny_checkpoint, "--adapter", tmp_path / "other", "--out", tmp_path / "m", "--quantize", "nf4"
    )
    assert result.exit_code == 2 and "was saved for a different base model" in result.output
    assert not (tmp_path / "m").exists()


def test_without_bitsandbytes_the_error_says_what_to_install(tiny_checkpoint, adapter, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['bitsandbytes'] = None\n"  # import bitsandbytes -> ImportError
        "from lorakit.cli import app\n"
        f"app(['merge', '--into-base', '--base', {str(tiny_checkpoint)!r}, '--adapter', {str(adapter)!r}, "
        f"'--out', {str(tmp_path / 'm')!r}, '--quantize', 'nf4'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "pip install 'lorakit[quant]'" in " ".join(done.stderr.split()), done.stderr


def test_help_documents_the_new_options():
    text = " ".join(runner.invoke(app, ["merge", "--help"]).stdout.replace("│", " ").split())
    for option in ("--quantize", "--quantized", "--calibration", "--drift-threshold", "lorakit[quant]", "dequantize"):
        assert option in text
