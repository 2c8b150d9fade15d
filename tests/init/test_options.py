"""Inits are options of every A/B method they list: PiSSA-initialised DoRA, the init registry's errors, and PEFT
loading the saved dirs of every init PEFT has."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.init import INITS
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def calibration() -> list[dict[str, torch.Tensor]]:
    ids = tokens(batch=4, length=8, seed=7)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_pissa_initialised_dora_is_an_identity_merges_and_round_trips(make, tmp_path):
    original, model, x = make(), make(), tokens()
    lk.attach(model, lk.method_config("dora", r=4, alpha=8, init="pissa"))
    torch.testing.assert_close(logits(model, x), logits(original, x), atol=1e-5, rtol=0)  # identity at init
    for _, wrapper in wrappers(model):
        adapter = wrapper.adapters["default"]
        assert type(adapter).__name__ == "Dora" and adapter.base_shift() is not None
        assert float((adapter.B.detach()).norm()) > 0  # B holds W's principal part, not zeros
    randomize_adapters(model, std=0.05)  # "trained"
    y = logits(model, x)
    assert (y - logits(original, x)).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=0)  # merge = forward
    lk.save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert fields["use_dora"] is True and fields["r"] == 8 and fields["init_lora_weights"] is True
    reloaded = lk.load_adapter(make(), tmp_path / "a")  # a plain DoRA of rank 2r on the ORIGINAL base
    torch.testing.assert_close(logits(reloaded, x), y, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "lora_ga", "eva", "gora", "lora_one"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_loads_the_saved_dir_of_every_init(init, method, tmp_path):
    """Residual-base inits are saved folded (init_lora_weights true); EVA keeps PEFT's "eva" and its eva_config."""
    model, x = tiny_llama(), tokens()
    calib = calibration() if INITS[init].calibration else None
    lk.attach(model, lk.method_config(method, r=2, init=init), targets=LLAMA, calibration=calib)
    randomize_adapters(model, std=0.05)
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    fields = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    peft_value = INITS[init].peft(INITS[init].options())["init_lora_weights"]
    assert fields["init_lora_weights"] == (True if INITS[init].shifts_base else peft_value)
    assert fields["use_dora"] is (method == "dora")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lk.load_adapter(tiny_llama(), tmp_path / "a"), x), y, atol=1e-5, rtol=0)


def test_unknown_inits_options_and_methods_are_clear_errors():
    with pytest.raises(lk.ConfigError, match=r"unknown init 'pisa'\. Did you mean 'pissa'"):
        lk.method_config("lora", init="pisa")
    with pytest.raises(lk.ConfigError, match="init 'pissa' has no option.*nitr.*valid init_options: niter"):
        lk.method_config("lora", init="pissa", init_options={"nitr": 2})
    with pytest.raises(lk.ConfigError, match="init 'default' takes no init_options"):
        lk.method_config("lora", init_options={"niter": 2})
    with pytest.raises(lk.ConfigError, match="init_options must be a dict"):
        lk.method_config("lora", init="pissa", init_options=3)
    bora = lk.method_config("bora", r=2, init="pissa")  # BoRA's config is LoRA's, but the init does not list it
    model = tiny_llama()
    y = logits(model, tokens())
    with pytest.raises(lk.ConfigError, match="init 'pissa' does not apply to method 'bora'; it applies to lora, dora"):
        lk.attach(model, bora, targets=LLAMA)
    assert lk.adapter_names(model) == [] and torch.equal(logits(model, tokens()), y)  # nothing left behind
    with pytest.raises(lk.ConfigError, match="init 'eva' of method 'dora' initialises from data"):
        lk.attach(tiny_llama(), lk.method_config("dora", init="eva"), targets=LLAMA)


def test_a_failing_init_leaves_the_model_as_it_was():
    model, x = tiny_llama(), tokens()
    y = logits(model, x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(lk.ConfigError, match="lora_ga"):
        lk.attach(model, lk.method_config("dora", r=2, init="lora_ga"), targets=LLAMA, calibration=[{"x": 1}])
    assert lk.adapter_names(model) == [] and torch.equal(logits(model, x), y)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_a_seed_before_attach_fixes_the_init_draws():
    """The init draws from the generator state attach began with: same seed, same GoRA A; another seed, another."""

    def factors(seed: int) -> torch.Tensor:
        model = tiny_llama()  # seeds the generator itself
        torch.manual_seed(seed)
        lk.attach(model, lk.method_config("lora", r=2, init="gora"), targets=["q_proj"], calibration=calibration())
        return torch.cat([w.adapters["default"].A.detach().flatten() for _, w in wrappers(model)])

    assert torch.equal(factors(1), factors(1)) and not torch.equal(factors(1), factors(2))
