"""Modules an adapter replaces whole (PEFT's ``modules_to_save``): train, switch, save, load, merge, PEFT parity."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.inject import SavedModule
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def with_saved(model, seed: int = 0, name: str = "default", saved=("lm_head", "norm")):
    lk.attach(model, lk.method_config("lora", r=4), targets=["q_proj", "v_proj"], name=name, modules_to_save=saved)
    randomize_adapters(model, seed=seed)
    for holder in model.modules():
        if isinstance(holder, SavedModule) and name in holder.copies:
            perturb(holder.copies[name], seed)
    return model


def test_copies_train_and_the_original_stays():
    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    with_saved(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.copies.default.weight" in trainable and "model.norm.copies.default.weight" in trainable
    assert not any(".base_layer." in n and "copies" not in n for n in trainable)
    x = tokens()
    model(x, labels=x).loss.backward()
    assert model.lm_head.copies["default"].weight.grad is not None
    assert model.lm_head.base_layer.weight.grad is None
    assert torch.equal(model.lm_head.base_layer.weight, head)


def test_switch_disable_and_delete():
    x = tokens()
    model = tiny_llama()
    y0 = logits(model, x)
    with_saved(model, seed=1, name="a")
    ya = logits(model, x)
    with_saved(model, seed=2, name="b", saved=("lm_head",))
    yb = logits(model, x)
    lk.set_active(model, "a")
    assert torch.equal(logits(model, x), ya) and not torch.allclose(ya, yb)
    with lk.disabled(model):
        assert torch.equal(logits(model, x), y0)
    lk.delete_adapter(model, "a")
    lk.delete_adapter(model, "b")
    assert not any(isinstance(m, SavedModule) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_llama().state_dict()) and torch.equal(logits(model, x), y0)


def test_save_load_round_trip_and_peft_layout(tmp_path):
    x = tokens()
    model = with_saved(tiny_llama())
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm", "lm_head"]
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, x), y, atol=1e-6, rtol=0)


def test_peft_loads_ours_and_we_load_peft(tmp_path):
    peft = pytest.importorskip("peft")
    x = tokens()
    model = with_saved(tiny_llama())
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    back = lk.load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(back, x), y, atol=1e-5, rtol=1e-5)


def test_merge_folds_saved_modules_and_unties_a_tied_head():
    x = tokens()
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    wte = model.transformer.wte.weight.detach().clone()
    lk.attach(model, lk.method_config("lora", r=4), targets=["c_attn"], modules_to_save=["lm_head"])
    randomize_adapters(model)
    perturb(model.lm_head.copies["default"], 0)
    y = logits(model, x)
    merged = lk.merge(model)
    torch.testing.assert_close(logits(merged, x), y, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.transformer.wte.weight, wte)  # the embedding keeps the original
    assert not merged.config.tie_word_embeddings


def test_bad_modules_to_save():
    with pytest.raises(lk.TargetError, match="matched no module"):
        lk.attach(tiny_llama(), lk.method_config("lora"), targets=["q_proj"], modules_to_save=["classifier"])
    with pytest.raises(lk.TargetError, match="both a target and in modules_to_save"):
        lk.attach(tiny_llama(), lk.method_config("lora"), targets=["q_proj"], modules_to_save=["q_proj"])
