"""VB-LoRA: every length-b sub-vector of A and B is a top-k softmax mixture of the one bank shared by all layers of
an attach; trainable = bank + logits (shared_params counts the bank once); the file holds the bank once at PEFT's
model-level key; PEFT parity both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.shared.vblora import VBLora
from lorakit.testing import randomize_adapters
from tests.helpers import MODELS, logits, tokens

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

TARGETS = {"llama": ["q_proj", "k_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
OPTS = {"r": 4, "num_vectors": 16, "vector_length": 32, "topk": 2}
X = tokens()


def ours(kind: str, seed: int = 0):
    model = MODELS[kind][0](0)
    torch.manual_seed(seed)
    lk.attach(model, lk.method_config("vblora", **OPTS), targets=TARGETS[kind])
    randomize_adapters(model, seed=1, std=0.2)
    return model


def peft_model(kind: str):
    config = peft.VBLoRAConfig(target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2", **OPTS)
    return peft.get_peft_model(MODELS[kind][0](0), config).eval()


def adapters(model):
    return [w.adapters["default"] for _, w in wrappers(model)]


def test_sub_vectors_are_top_k_mixtures_of_one_bank_and_the_paper_parameter_count():
    model = ours("llama")
    layers = adapters(model)
    bank = layers[0].shared.bank  # (16, 32)
    assert len({id(a.shared.bank) for a in layers}) == 1 and len(layers) == 8
    b, k = OPTS["vector_length"], OPTS["topk"]
    for a in layers:
        A, B = a.factors().A, a.factors().B  # (r, in), (out, r)
        for z, sub in ((a.logits_A, A.reshape(4, -1, b)), (a.logits_B, B.T.reshape(4, -1, b).transpose(0, 1))):
            z = z.reshape(-1, 16)  # one row of logits per sub-vector
            top = z.topk(k, dim=-1)
            ref = torch.stack([torch.softmax(v, 0) @ bank[i] for v, i in zip(top.values, top.indices, strict=True)])
            torch.testing.assert_close(sub.reshape(-1, b), ref)  # each sub-vector: Σ_top-k softmax(z)_i·bank_i
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 + 2 * len(layers)  # one bank, two logit tensors per layer
    d = {"q_proj": (64, 64), "k_proj": (64, 32), "up_proj": (64, 128), "down_proj": (128, 64)}
    per_layer = sum(4 * 16 * (i + o) // b for i, o in d.values()) * 2  # r·n·(in+out)/b, two blocks
    assert sum(p.numel() for p in trainable) == 16 * b + per_layer  # bank + logits


def test_rank_pattern_layers_share_the_bank_and_a_second_attach_gets_its_own():
    cfg = lk.method_config("vblora", **OPTS)
    model = MODELS["llama"][0](0)
    lk.attach(model, cfg, targets=["q_proj", "down_proj"], name="a", rank_pattern={"down_proj": 2})
    lk.attach(model, cfg, targets=["q_proj"], name="b")
    a = [w.adapters["a"] for _, w in wrappers(model)]
    b = [w.adapters["b"] for _, w in wrappers(model) if "b" in w.adapters]
    assert {x.config.r for x in a} == {2, 4} and len({id(x.shared) for x in a}) == 1
    assert len({id(x.shared) for x in b}) == 1 and a[0].shared is not b[0].shared


@pytest.mark.parametrize("kind", MODELS)
def test_same_weights_in_peft_give_the_same_outputs(kind):
    model, theirs = ours(kind), peft_model(kind)
    with torch.no_grad():
        theirs.base_model.vblora_vector_bank["default"].copy_(adapters(model)[0].shared.bank)
        for name, wrapper in wrappers(model):
            layer = theirs.base_model.model.get_submodule(name)
            layer.vblora_logits_A["default"].copy_(wrapper.adapters["default"].logits_A)
            layer.vblora_logits_B["default"].copy_(wrapper.adapters["default"].logits_B)
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), X), logits(lk.merge(model), X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_lorakit_dir_loads_in_peft_with_the_bank_once(kind, tmp_path):
    model = ours(kind)
    lk.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "VBLORA" and config["vector_length"] == 32
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert [k for k in keys if "vector_bank" in k] == ["base_model.vblora_vector_bank"]
    assert len(keys) == 1 + 2 * len(adapters(model))
    theirs = peft.PeftModel.from_pretrained(MODELS[kind][0](0), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)
    back = lk.load_adapter(MODELS[kind][0](0), tmp_path / "a")  # and back into lorakit: one shared bank again
    assert len({id(a.shared) for a in adapters(back)}) == 1
    torch.testing.assert_close(logits(back, X), logits(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_peft_dir_loads_in_lorakit(kind, tmp_path):
    theirs = peft_model(kind)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "vblora" in name:
                p.add_(torch.randn(p.shape) * 0.2)
    theirs.save_pretrained(tmp_path / "p")
    loaded = lk.load_adapter(MODELS[kind][0](0), tmp_path / "p")
    torch.testing.assert_close(logits(loaded, X), logits(theirs, X), atol=1e-5, rtol=1e-5)


def test_missing_bank_and_topk_only_dirs_are_clear_errors(tmp_path):
    model = ours("llama")
    lk.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    keys = load_file(file)
    del keys["base_model.vblora_vector_bank"]
    save_file(keys, file)
    with pytest.raises(lk.AdapterFormatError, match="vblora_vector_bank"):
        lk.load_adapter(MODELS["llama"][0](0), tmp_path / "a")
    theirs = peft.get_peft_model(
        MODELS["llama"][0](0), peft.VBLoRAConfig(target_modules=["q_proj"], save_only_topk_weights=True, **OPTS)
    )
    theirs.save_pretrained(tmp_path / "p")
    with pytest.raises(lk.AdapterFormatError, match="save_only_topk_weights"):
        lk.load_adapter(MODELS["llama"][0](0), tmp_path / "p")


def test_shapes_the_bank_cannot_tile_embeddings_and_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="vector_length=48 must divide"):
        lk.attach(MODELS["llama"][0](0), lk.method_config("vblora", vector_length=48), targets=["q_proj"])
    with pytest.raises(lk.TargetError, match="vblora"):
        lk.attach(MODELS["llama"][0](0), lk.method_config("vblora"), targets=["embed_tokens"])
    with pytest.raises(lk.ConfigError, match="topk=9 exceeds num_vectors=8"):
        lk.method_config("vblora", topk=9, num_vectors=8)
    assert VBLora.config_from_peft({"peft_type": "LORA"}) is None
