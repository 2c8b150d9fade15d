"""QA-LoRA: the adapter sees group-pooled inputs, so ΔW is constant over each group of g inputs and a merge onto
an integer group-quantized base (int4g) only moves the zero points: the merged model is still quantized, its
codes are bit-identical and its logits equal the unmerged adapter's (issue 18). PEFT's QA-LoRA forward (its
GPTQ layer wrapper, here around our int4g layer) gives the same outputs from the saved dir."""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.lowrank.qalora import Qalora
from lorakit.quant import merge_drift, quantized_kinds
from lorakit.quant.intgroup import IntGroupLinear
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import assert_mixed_batch_equals_alone, logits, tokens

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(kind: str = "int4g", **opts) -> nn.Module:
    model = lk.quantize(tiny_llama(seed=3), kind)
    lk.attach(model, lk.method_config("qalora", r=4, alpha=8, **opts), targets=TARGETS)
    randomize_adapters(model, seed=1, std=0.3)
    return model


def stored(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(codes, scales, zero points) of every integer group layer, in module order."""
    layers = [m for m in model.modules() if isinstance(m, IntGroupLinear)]
    return [(m.weight.detach().clone(), m.scales.clone(), m.zeros.clone()) for m in layers]


def test_delta_is_constant_over_each_group_and_to_lora_is_exact():
    base = nn.Linear(64, 12)
    adapter = Qalora.from_base(base, lk.method_config("qalora", r=3, group_size=16))
    randomize_adapters(adapter, std=0.3)
    delta = adapter.delta_weight(base)  # (out, in)
    assert delta.shape == (12, 64) and adapter.A.shape == (3, 4)
    assert torch.equal(delta, delta[:, ::16].repeat_interleave(16, dim=1))
    x = torch.randn(5, 64)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x) + x @ delta.T, atol=1e-6, rtol=1e-6)
    f = adapter.to_lora(base)
    assert f.A.shape == (3, 64) and torch.linalg.matrix_rank(f.scale * f.B @ f.A) == 3
    torch.testing.assert_close(f.scale * f.B @ f.A, delta, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64])  # the base's group size, or a multiple of it
def test_merge_onto_int4g_stays_on_the_grid_and_equals_the_unmerged_forward(group_size):
    model, x = adapted(group_size=group_size), tokens()
    y = logits(model, x)
    before = stored(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no drift warning
        merged = lk.merge(model, calibration=x)
    assert quantized_kinds(merged) == {"intgroup"} and lk.adapter_names(merged) == []
    after = stored(merged)
    assert len(after) == len(before) == 14
    for (codes, scales, zeros), (codes2, scales2, zeros2) in zip(before, after, strict=True):
        assert torch.equal(codes, codes2) and torch.equal(scales, scales2)  # bit-identical
        assert not torch.equal(zeros, zeros2)  # the update went into the zero points
    torch.testing.assert_close(logits(merged, x), y, atol=1e-5, rtol=0)
    report = merge_drift(merged)
    assert report.mode == "requantize" and len(report.drift) == 14
    assert max(report.relative.values()) < 1e-5 and report.max_abs_logit < 1e-5 and report.kl < 1e-6
    assert lk.adapter_names(model) == ["default"] and torch.equal(logits(model, x), y)  # the input is untouched


def test_a_pooling_finer_than_the_quantization_groups_is_requantized():
    model, x = adapted(group_size=16), tokens()  # ΔW constant over 16 inputs, int4g's groups are 32 wide
    y = logits(model, x)
    merged = lk.merge(model, calibration=x)
    assert quantized_kinds(merged) == {"intgroup"}
    report = merge_drift(merged)
    assert min(report.relative.values()) > 1e-3 and report.max_abs_logit > 1e-4  # re-quantized: drift
    torch.testing.assert_close(logits(lk.merge(model, quantized="dequantize"), x), y, atol=1e-5, rtol=0)


def test_trains_on_int4g_and_the_trained_adapter_merges_exactly():
    model, x = adapted(), tokens()
    randomize_adapters(model, seed=1, std=0.0)  # B = A = 0: start from zero
    for _, wrapper in wrappers(model):
        nn.init.normal_(wrapper.adapters["default"].A, std=0.1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    torch.testing.assert_close(logits(lk.merge(model), x), logits(model, x), atol=1e-5, rtol=0)


def test_group_size_must_divide_the_input_width():
    with pytest.raises(lk.ConfigError, match="group_size must be a positive integer"):
        lk.method_config("qalora", group_size=0)
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match=r"group_size=48 must divide the layer's in_features=64"):
        lk.attach(model, lk.method_config("qalora", group_size=48), targets=["q_proj"])
    assert lk.adapter_names(model) == []


@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # PEFT on a layer it does not know: ours
def test_saved_dir_is_peft_use_qalora_and_peft_qalora_forward_agrees(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.gptq import GPTQLoraLinear

    model, x = adapted(), tokens()
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert fields["peft_type"] == "LORA" and fields["use_qalora"] is True and fields["qalora_group_size"] == 32
    assert "lorakit" not in fields  # PEFT's own format
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "a"))
    tensors = safetensors.torch.load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    theirs = lk.quantize(tiny_llama(seed=3), "int4g")  # PEFT wraps GPTQ layers only: our int4g stands in for one
    for name in [n for n, m in theirs.named_modules() if isinstance(m, IntGroupLinear)]:
        layer = GPTQLoraLinear(
            theirs.get_submodule(name), "default", config=config, r=config.r, lora_alpha=config.lora_alpha
        )
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B["default"].weight.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
        parent, _, child = name.rpartition(".")
        setattr(theirs.get_submodule(parent), child, layer)
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
    again = lk.load_adapter(lk.quantize(tiny_llama(seed=3), "int4g"), tmp_path / "a")
    torch.testing.assert_close(logits(again, x), y, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT's plain Linear ignores use_qalora
        peft.PeftModel.from_pretrained(tiny_llama(seed=3), str(tmp_path / "a"))


def test_serving_a_mixed_batch_on_int4g_equals_each_adapter_alone(tmp_path):
    base = lk.quantize(tiny_llama(seed=3), "int4g")  # serving takes qalora through its exact to_lora form
    configs = {m: lk.method_config(m, r=4, alpha=8) for m in ("qalora", "lora")}
    assert_mixed_batch_equals_alone(base, configs, tmp_path, targets=TARGETS)


def test_export_to_vllm_writes_the_exact_plain_lora(tmp_path):
    from lorakit.io.export import export_vllm, vllm_problems

    model, x = adapted(), tokens()
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "qalora")
    assert any("use_qalora" in p for p in vllm_problems(tmp_path / "qalora"))
    report = export_vllm([tmp_path / "qalora"], tmp_path / "out", base=lk.quantize(tiny_llama(seed=3), "int4g"))
    assert report.methods == {"qalora": "qalora"} and vllm_problems(tmp_path / "out" / "qalora") == []
    plain = lk.load_adapter(lk.quantize(tiny_llama(seed=3), "int4g"), tmp_path / "out" / "qalora")
    assert {type(w.adapters["default"]).__name__ for _, w in wrappers(plain)} == {"Lora"}
    torch.testing.assert_close(logits(plain, x), y, atol=1e-5, rtol=1e-5)
