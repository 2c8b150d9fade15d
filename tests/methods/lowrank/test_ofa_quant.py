"""OFA (One QuantLLM for ALL): a supernet whose layers run Q_b(W)·x + s·B_b·A_b·x at the active bit-width b, one
decoupled LoRA per b; only the active pair trains; a sampled bit-width per step (set_step); an extracted subnet
(int{b}g quantized model + plain lora dir) gives the supernet's logits exactly (issue 18, PAPERS row 40)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.extract import extract_subnet
from lorakit.inject import wrappers
from lorakit.methods.lowrank.ofa_quant import OfaQuant, OfaQuantConfig, activate, ofa_layers, sample_bits
from lorakit.quant.intgroup import IntGroupLinear, quantize_linear
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

TARGETS = ["q_proj", "v_proj", "down_proj"]


def supernet(**opts) -> torch.nn.Module:
    model = tiny_llama(seed=3)
    lk.attach(model, lk.method_config("ofa_quant", r=4, alpha=8, **opts), targets=TARGETS)
    randomize_adapters(model, seed=1, std=0.3)
    return model


def test_layer_computes_quantized_base_plus_its_bit_widths_lora():
    model = supernet()
    name, w = next(iter(wrappers(model)))
    adapter: OfaQuant = w.adapters["default"]  # type: ignore[assignment]
    x = torch.randn(3, w.in_features)
    for b in (2, 3, 4):
        activate(model, b)
        Wq = quantize_linear(w.base_layer, bits=b, group_size=32).dequantized()
        A, B = adapter.factors(b)
        expected = F.linear(x, Wq) + 2.0 * (x @ A.T @ B.T)  # s = alpha / r = 2
        with torch.no_grad():
            torch.testing.assert_close(w(x), expected, atol=1e-5, rtol=1e-5)
    assert activate(model, {name: 3})[name] == 3 and adapter.active_bits == 3


def test_per_layer_config_and_bad_configs():
    model = supernet()
    names = list(ofa_layers(model))
    now = activate(model, {names[0]: 2, names[1]: 4})
    assert now[names[0]] == 2 and now[names[1]] == 4
    with pytest.raises(lk.ConfigError, match="not 8"):
        activate(model, 8)
    with pytest.raises(lk.ConfigError, match="not ofa_quant layers"):
        activate(model, {"lm_head": 2})
    with pytest.raises(lk.ConfigError, match="bits must be distinct"):
        OfaQuantConfig(bits=(2, 2))


def test_only_the_active_bit_widths_adapter_gets_gradients():
    model = supernet()
    activate(model, 3)
    model(tokens()).logits.sum().backward()
    for name, p in model.named_parameters():
        if ".adapters." in name:
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (".3" in name), name
        else:
            assert p.grad is None, name


def test_step_sampler_is_global_seeded_and_follows_weights():
    model = supernet(seed=5)
    adapters = list(ofa_layers(model).values())
    seen = set()
    for step in range(40):
        for a in adapters:
            a.set_step(step)
        assert len({a.active_bits for a in adapters}) == 1  # one configuration per step, all layers
        seen.add(adapters[0].active_bits)
        assert adapters[0].active_bits == sample_bits(adapters[0].config, step)  # reproducible after a resume
    assert seen == {2, 3, 4}
    only4 = OfaQuantConfig(weights=(0, 0, 1))
    assert {sample_bits(only4, s) for s in range(20)} == {4}


def test_adapter_steps_callback_samples_the_bit_width_each_step():
    from types import SimpleNamespace

    from lorakit.train.callbacks.adapter_steps import AdapterSteps

    model = supernet()
    adapters = list(ofa_layers(model).values())
    for step in range(6):
        AdapterSteps().on_step_begin(SimpleNamespace(model=model, step=step))  # type: ignore[arg-type]
        assert {a.active_bits for a in adapters} == {sample_bits(adapters[0].config, step)}


@pytest.mark.parametrize("config", [2, 4, "mixed"])
def test_extracted_subnet_is_quantized_and_gives_identical_logits(tmp_path, config):
    model = supernet()
    names = list(ofa_layers(model))
    chosen = {n: (2, 3, 4)[i % 3] for i, n in enumerate(names)} if config == "mixed" else config
    x = tokens()
    activate(model, chosen)  # type: ignore[arg-type]
    y = logits(model, x)
    sub = extract_subnet(model, chosen, tmp_path / "sub")  # type: ignore[arg-type]
    assert torch.equal(logits(sub, x), y)  # exact: the same ops in the same order
    with torch.enable_grad():  # the training-path forward too
        torch.testing.assert_close(sub(x).logits, model(x).logits, atol=0, rtol=0)
    bits = {n: w.base_layer.bits for n, w in wrappers(sub)}
    assert bits == ({n: config for n in names} if isinstance(config, int) else chosen)
    assert all(isinstance(w.base_layer, IntGroupLinear) for _, w in wrappers(sub))
    # the saved dir is a plain lora: loaded onto the same quantized base, the same logits
    base = extract_subnet(model, chosen)  # type: ignore[arg-type]
    lk.delete_adapter(base, "default")
    lk.load_adapter(base, tmp_path / "sub")
    assert lk.REGISTRY["lora"].adapter is type(next(iter(wrappers(base)))[1].adapters["default"])
    assert torch.equal(logits(base, x), y)
    assert activate(model, 3)  # the supernet itself is unchanged by extraction


def test_supernet_save_load_round_trips_every_bit_width(tmp_path):
    model = supernet()
    lk.save_adapter(model, tmp_path / "ofa")
    activate(model, 3)
    lk.save_adapter(model, tmp_path / "at3")
    assert set(activate(lk.load_adapter(tiny_llama(seed=3), tmp_path / "at3"), {}).values()) == {3}  # saved config
    again = lk.load_adapter(tiny_llama(seed=3), tmp_path / "ofa")
    x = tokens()
    for b in (2, 3, 4):
        activate(model, b)
        activate(again, b)
        assert torch.equal(logits(again, x), logits(model, x))


def test_gpt2_conv1d_subnet_is_exact():
    model = tiny_gpt2(seed=0)
    lk.attach(model, lk.method_config("ofa_quant", r=4, bits=(2, 4)), targets=["c_attn", "c_fc"])
    randomize_adapters(model, seed=2, std=0.3)
    activate(model, 2)
    x = tokens()
    assert torch.equal(logits(extract_subnet(model), x), logits(model, x))
