"""lk.merge onto a quantized base: re-quantized (default) or dequantized, with a drift report and a warning."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.quant import merge_drift, quantized_kinds
from lorakit.quant._merge import reload_change
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens

pytest.importorskip("bitsandbytes")


def adapted(kind: str = "nf4", std: float = 0.3) -> nn.Module:
    model = lk.attach(lk.quantize(tiny_llama(seed=2), kind), lk.method_config("lora", r=4, alpha=8))
    randomize_adapters(model, seed=1, std=std)
    return model


@pytest.mark.parametrize("kind, layer_kind", [("nf4", "bnb4bit"), ("int8", "bnb8bit")])
def test_requantized_merge_reports_its_drift(kind, layer_kind, tmp_path):
    model, x = adapted(kind), tokens()
    y = logits(model, x)
    merged = lk.merge(model, calibration=x)
    assert quantized_kinds(merged) == {layer_kind} and lk.adapter_names(merged) == []
    report = merge_drift(merged)
    assert report.mode == "requantize" and len(report.drift) == len(report.relative) == 14
    assert all(d > 0 for d in report.drift.values()) and all(0 < r < 1 for r in report.relative.values())
    assert report.max_abs_logit == pytest.approx(float((logits(merged, x) - y).abs().max()), abs=1e-6)
    assert report.max_abs_logit > 0 and report.kl > 0
    saved = json.loads(report.save(tmp_path / "drift.json").read_text())
    assert saved["mode"] == "requantize" and set(saved["drift"]) == set(report.drift)
    assert lk.adapter_names(model) == ["default"]  # the adapted model itself is untouched


def test_dequantized_merge_is_exact():
    model, x = adapted(), tokens()
    y = logits(model, x)
    merged = lk.merge(model, quantized="dequantize", calibration=x)
    assert quantized_kinds(merged) == set()
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("proj"))
    report = merge_drift(merged)
    assert max(report.drift.values()) < 1e-4 and report.kl < 1e-8
    torch.testing.assert_close(logits(merged, x), y, atol=1e-5, rtol=1e-5)


def test_a_drift_above_the_threshold_warns_and_names_the_layers():
    model = adapted(std=1e-4)  # an update far below NF4's step: re-quantizing loses most of it
    with pytest.warns(UserWarning, match=r"lost more than 0.5·‖ΔW‖ .* model\.layers\.0\..*quantized='dequantize'"):
        merged = lk.merge(model)
    assert len(merge_drift(merged).over()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.merge(model, drift_threshold=1e9)


def test_bad_input_and_full_precision_bases():
    with pytest.raises(lk.ConfigError, match="quantized must be one of requantize, dequantize, got 'nf4'"):
        lk.merge(adapted(), quantized="nf4")
    plain = lk.attach(tiny_llama(), lk.method_config("lora", r=2))
    assert merge_drift(lk.merge(plain)) is None  # no quantized layer: no report


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "int4g", "int3g"])
def test_a_requantized_merge_maps_its_own_values_onto_itself(kind):
    """What `lorakit merge --into-base --quantize` relies on: it saves the merged layers' float values, and
    quantizing them again with the same kind gives the same quantized weights (exactly for bitsandbytes)."""
    merged = lk.merge(adapted(kind))
    assert reload_change(merged) <= (0 if kind in ("nf4", "fp4", "int8") else 1e-6)


def test_zero_points_that_absorbed_a_qalora_delta_do_not_reload_exactly():
    model = lk.attach(lk.quantize(tiny_llama(seed=2), "int4g"), lk.method_config("qalora", r=4, group_size=32))
    randomize_adapters(model, seed=1, std=0.3)
    assert reload_change(lk.merge(model)) > 1e-3  # shifted zero points: a new min-max grid (0 in range) differs
