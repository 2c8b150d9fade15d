"""RILQ (quant/rilq.py): adapters on a 2-bit base trained jointly against the full-precision teacher's activations;
the discrepancy falls, and the adapters merge onto the 2-bit base (re-quantized, with a drift report) or dequantize."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.quant import QUANTS, merge_drift, quantized_kinds
from lorakit.quant.rilq import discrepancy, rilq
from lorakit.testing import tiny_llama


def setup(r: int = 4):
    teacher = tiny_llama(seed=0)
    base = lk.quantize(copy.deepcopy(teacher), "int2g")  # 2-bit codes, a scale and a zero point per 32 inputs
    torch.manual_seed(0)
    student = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=r, alpha=2 * r))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 256, (2, 16), generator=g)} for _ in range(2)]
    batches[1]["attention_mask"] = torch.ones(2, 16, dtype=torch.long)
    batches[1]["attention_mask"][1, 12:] = 0  # padding is left out of the loss
    return teacher, base, student, batches


def test_the_discrepancy_falls_below_the_untrained_adapters():
    assert QUANTS["int2g"].bits == 2
    teacher, base, student, batches = setup()
    untrained = discrepancy(teacher, student, batches)  # B = 0: the 2-bit base alone
    assert untrained == pytest.approx(discrepancy(teacher, base, batches), rel=1e-6) and untrained > 0.1
    result = rilq(teacher, student, batches, steps=30, lr=1e-2)
    assert result.before == pytest.approx(untrained, rel=1e-6) and len(result.losses) == 30
    assert result.after < 0.4 * result.before  # measured: 0.21 -> 0.05
    assert result.after == pytest.approx(discrepancy(teacher, student, batches), rel=1e-6)
    trained = [p for p in student.parameters() if p.requires_grad]
    assert all(float(p.detach().abs().sum()) > 0 for p in trained)  # every layer's A and B moved, jointly
    assert quantized_kinds(student) == {"intgroup"}  # the base stayed 2-bit


@pytest.mark.parametrize("outputs", ["logits", ["model.layers.0", "model.layers.1"]])
def test_other_outputs_compared(outputs):
    teacher, _, student, batches = setup(r=2)
    result = rilq(teacher, student, batches, steps=10, lr=1e-2, outputs=outputs)
    assert result.after < 0.7 * result.before


def test_the_adapters_merge_onto_the_2bit_base_with_a_drift_report():
    teacher, _, student, batches = setup()
    rilq(teacher, student, batches, steps=30, lr=1e-2)
    ids = batches[0]["input_ids"]
    merged = lk.merge(student, calibration=ids, drift_threshold=2.0)  # re-quantized onto int2g
    assert quantized_kinds(merged) == {"intgroup"} and lk.adapter_names(merged) == []
    assert {m.quant_kind for m in merged.modules() if hasattr(m, "quant_kind")} == {"int2g"}
    report = merge_drift(merged)
    assert report.mode == "requantize" and len(report.drift) == 14 and report.kl > 0
    assert all(r > 0 for r in report.relative.values())  # the 2-bit grid loses much of each update
    exact = lk.merge(student, quantized="dequantize", calibration=ids)
    assert merge_drift(exact).max_abs_logit < 1e-4
    trained = discrepancy(teacher, student, batches)
    assert discrepancy(teacher, exact, batches) == pytest.approx(trained, rel=1e-4)


def test_bad_input():
    teacher, base, student, batches = setup()
    with pytest.raises(lk.ConfigError, match=r"has none \(or none trainable\); lk.attach"):
        rilq(teacher, base, batches, steps=1)
    with pytest.raises(lk.ConfigError, match="shares parameters with the teacher"):
        rilq(student, student, batches, steps=1)
    with pytest.raises(lk.ConfigError, match="at least one calibration batch"):
        rilq(teacher, student, [], steps=1)
    with pytest.raises(lk.ConfigError, match="steps >= 1 and lr > 0"):
        rilq(teacher, student, batches, steps=0)
    with pytest.raises(lk.ConfigError, match="outputs must be 'hidden', 'logits'"):
        rilq(teacher, student, batches, steps=1, outputs="h")
    with pytest.raises(lk.ConfigError, match=r"do not both have: \['model.layers.9'\]"):
        rilq(teacher, student, batches, steps=1, outputs=["model.layers.0", "model.layers.9"])
