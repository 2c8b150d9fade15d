"""The pure-torch integer group quantizer (int4g, int4g128, int3g, int2g): its grid, its layer kind, lk.quantize
with it, the zero-point ``absorb`` hook, and merges onto it (QA-LoRA's on-grid merge is in
tests/methods/lowrank/test_qalora.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.quant import QUANTS, merge_drift, quantized_kinds
from lorakit.quant.intgroup import IntGroupLinear, absorb_zero_points, quantize_linear
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens


def test_the_integer_group_kinds_are_registered():
    assert {k: (QUANTS[k].bits, QUANTS[k].backend) for k in ("int4g", "int4g128", "int3g", "int2g")} == {
        "int4g": (4, "torch"), "int4g128": (4, "torch"), "int3g": (3, "torch"), "int2g": (2, "torch")
    }  # fmt: skip
    assert all(QUANTS[k].absorb is absorb_zero_points for k in ("int4g", "int4g128", "int3g", "int2g"))
    assert QUANTS["nf4"].absorb is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_features", [64, 70])  # 70: a last group of 6 inputs
def test_codes_scales_and_zero_points_are_gptq_min_max(bits, in_features):
    torch.manual_seed(bits)
    dense = nn.Linear(in_features, 12)
    q = quantize_linear(dense, bits=bits, group_size=32)
    W, maxq, groups = dense.weight.detach(), 2**bits - 1, -(-in_features // 32)
    assert q.scales.shape == q.zeros.shape == (12, groups) and q.weight.dtype == torch.uint8
    assert q.weight.numel() == 12 * groups * 32 // (8 // bits if bits != 3 else 1)  # packed 8 // b to a byte
    for G in range(groups):  # the semantics, one group at a time
        w = W[:, 32 * G : 32 * (G + 1)]
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s = (hi - lo) / maxq
        z = torch.round(-lo / s)
        torch.testing.assert_close(q.scales[:, G], s, atol=0, rtol=0)
        assert torch.equal(q.zeros[:, G], z)
        codes = (torch.round(w / s[:, None]) + z[:, None]).clamp(0, maxq)
        assert torch.equal(q.codes()[:, 32 * G : 32 * G + w.shape[1]].float(), codes)
        assert torch.equal(q.dequantized()[:, 32 * G : 32 * (G + 1)], s[:, None] * (codes - z[:, None]))
    step = q.scales.repeat_interleave(32, dim=1)[:, :in_features]
    assert bool(((q.dequantized() - W).abs() <= step / 2 + 1e-6).all())  # round to nearest on the grid
    x = torch.randn(3, in_features)
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantized(), dense.bias), atol=1e-6, rtol=0)


def test_an_all_zero_group_and_bad_settings():
    dense = nn.Linear(32, 2, bias=False)
    nn.init.zeros_(dense.weight)
    q = quantize_linear(dense)
    assert torch.equal(q.dequantized(), dense.weight.detach()) and bool((q.scales > 0).all())
    with pytest.raises(lk.ConfigError, match="bits in 2|3|4|8"):
        quantize_linear(dense, bits=5)
    with pytest.raises(lk.ConfigError, match="group size"):
        quantize_linear(dense, bits=2, group_size=6)  # 4 codes per byte: a group must fill whole bytes


def test_lk_quantize_int4g_and_its_layer_kind():
    model, x = tiny_llama(), tokens()
    y = logits(model, x)
    lk.quantize(model, "int4g")
    projections = [m for n, m in model.named_modules() if n.endswith("proj")]
    assert len(projections) == 14 and all(type(m) is IntGroupLinear for m in projections)
    assert type(model.lm_head) is nn.Linear and quantized_kinds(model) == {"intgroup"}
    assert not hasattr(model, "is_loaded_in_4bit")  # PEFT must not take it for a bitsandbytes model
    y_q = logits(model, x)
    assert 0 < float((y_q - y).abs().max()) < 0.2 * float(y.abs().max())  # NF4: 0.15
    q = model.model.layers[0].mlp.down_proj
    assert L.layer_kind(q) == "linear" and L.is_quantized(q) and L.dims(q) == (128, 64)
    xs = torch.randn(3, 128)
    torch.testing.assert_close(L.base_linear(q, xs), nn.functional.linear(xs, L.weight_out_in(q)), atol=1e-6, rtol=0)
    with pytest.raises(lk.TargetError, match="intgroup layer holds it quantized"):
        L.require_dense(q, "merging")
    torch.testing.assert_close(logits(lk.dequantize(model), x), y_q, atol=1e-5, rtol=1e-5)


def test_absorb_takes_a_group_constant_delta_into_the_zero_points_only():
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(70, 8), bits=4, group_size=32)
    per_group = torch.randn(8, 3) * 0.05  # (out, G)
    delta = per_group.repeat_interleave(32, dim=1)[:, :70]  # (out, in), constant over each group
    merged = absorb_zero_points(q, delta, torch.ones(8))
    assert merged is not None and merged is not q
    assert torch.equal(merged.weight, q.weight) and torch.equal(merged.scales, q.scales)
    assert not torch.equal(merged.zeros, q.zeros)
    torch.testing.assert_close(merged.dequantized(), q.dequantized() + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.bias, q.bias + 1)
    delta[0, 5] += 1e-3  # one entry off its group's value: not absorbable, re-quantize instead
    assert absorb_zero_points(q, delta, None) is None


def test_a_lora_merge_onto_int4g_requantizes_with_a_drift_report():
    model, x = lk.attach(lk.quantize(tiny_llama(seed=2), "int4g"), lk.method_config("lora", r=4)), tokens()
    randomize_adapters(model, seed=1, std=0.3)
    y = logits(model, x)
    merged = lk.merge(model, calibration=x)
    assert quantized_kinds(merged) == {"intgroup"}
    assert {m.quant_kind for m in merged.modules() if isinstance(m, IntGroupLinear)} == {"int4g"}
    report = merge_drift(merged)
    assert len(report.drift) == 14 and all(0 < r < 1 for r in report.relative.values())  # LoRA's ΔW is off-grid
    assert report.max_abs_logit == pytest.approx(float((logits(merged, x) - y).abs().max()), abs=1e-6)
    exact = lk.merge(model, quantized="dequantize")
    torch.testing.assert_close(logits(exact, x), y, atol=1e-5, rtol=1e-5)
