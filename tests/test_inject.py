"""Target selection, per-module patterns, several named adapters, merging, and the wrapper's face."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.inject import AdaptedLayer, find_targets
from lorakit.methods import REGISTRY
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import adapt, has_wrappers, logits, tokens

X = tokens()


def names_where(model: nn.Module, keep) -> list[str]:
    """Module names (in model order) for which ``keep(name, module)`` holds: the expected target lists."""
    return [n for n, m in model.named_modules() if n and keep(n, m)]


def wrapped(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize(
    "builder, targets, keep",
    [
        (tiny_llama, ["q_proj"], lambda n, m: n.endswith(".q_proj")),
        (tiny_llama, ["self_attn.v_proj", "embed_tokens"], lambda n, m: n.endswith((".v_proj", "embed_tokens"))),
        (
            tiny_llama,
            r"model\.layers\.0\.self_attn\.(q|v)_proj",
            lambda n, m: re.search(r"layers\.0\..*\.[qv]_proj$", n),
        ),
        (tiny_llama, "all-linear", lambda n, m: isinstance(m, nn.Linear) and n != "lm_head"),
        (tiny_gpt2, "all-linear", lambda n, m: isinstance(m, Conv1D)),
        (tiny_gpt2, ["c_proj"], lambda n, m: n.endswith(".c_proj")),
        (tiny_gpt2, ["mlp.c_proj"], lambda n, m: n.endswith("mlp.c_proj")),
    ],
    ids=["suffix", "suffixes", "regex", "all-linear-llama", "all-linear-gpt2", "gpt2-suffix", "gpt2-dotted-suffix"],
)
def test_find_targets(builder, targets, keep):
    model = builder()
    expected = names_where(model, keep)
    assert expected and find_targets(model, targets) == expected
    assert "lm_head" not in find_targets(model, targets)


def test_all_linear_on_gpt2_covers_conv1d_and_skips_head():
    model = tiny_gpt2()
    found = find_targets(model, "all-linear")
    assert {type(model.get_submodule(n)) for n in found} == {Conv1D}
    assert len(found) == 4 * model.config.n_layer and "lm_head" not in found


@pytest.mark.parametrize(
    "exclude, dropped",
    [
        (["down_proj", "gate_proj"], lambda n: n.endswith((".down_proj", ".gate_proj"))),
        (r".*\.layers\.1\..*", lambda n: ".layers.1." in n),
    ],
    ids=["list", "regex"],
)
def test_exclude(exclude, dropped):
    model = tiny_llama()
    every = find_targets(model, "all-linear")
    kept = find_targets(model, "all-linear", exclude=exclude)
    assert kept == [n for n in every if not dropped(n)] and len(kept) < len(every)


def test_rank_and_alpha_patterns_apply_per_module():
    model = tiny_llama()
    lk.attach(
        model,
        lk.method_config("lora", r=4, alpha=8),
        targets="all-linear",
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        alpha_pattern={"o_proj": 3.0},
    )
    for name, wrapper in wrapped(model).items():
        adapter = wrapper.adapters["default"]
        r = 2 if name.endswith("v_proj") else 6 if name == "model.layers.1.self_attn.q_proj" else 4
        alpha = 3.0 if name.endswith("o_proj") else 8.0
        assert (adapter.config.r, adapter.config.alpha) == (r, alpha), name
        assert adapter.scale == pytest.approx(alpha / r), name
        assert all(r in p.shape for p in adapter.parameters()), name  # factors really have that rank


def test_two_adapters_on_different_targets():
    model = tiny_llama()
    y0 = logits(model, X)
    adapt(model, "lora", "a", seed=1, targets=["q_proj"])
    adapt(model, "dora", "b", seed=2, targets=["v_proj", "embed_tokens"])
    assert lk.adapter_names(model) == ["a", "b"]
    layers = wrapped(model)
    assert {n for n, w in layers.items() if "a" in w.adapters} == set(find_targets(tiny_llama(), ["q_proj"]))
    assert {n for n, w in layers.items() if "b" in w.adapters} == set(
        find_targets(tiny_llama(), ["v_proj", "embed_tokens"])
    )
    for name, method, seed, targets in (("a", "lora", 1, ["q_proj"]), ("b", "dora", 2, ["v_proj", "embed_tokens"])):
        lk.set_active(model, name)
        alone = logits(adapt(tiny_llama(), method, name, seed=seed, targets=targets), X)
        assert (alone - y0).abs().max() > 1e-3
        torch.testing.assert_close(logits(model, X), alone, atol=1e-6, rtol=0)
        merged = lk.merge(model)
        torch.testing.assert_close(logits(merged, X), alone, atol=1e-5, rtol=1e-5)
    lk.delete_adapter(model, "a")
    assert set(wrapped(model)) == set(find_targets(tiny_llama(), ["v_proj", "embed_tokens"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_same_targets_share_one_wrapper():
    model = adapt(adapt(tiny_llama(), "lora", "a", targets=["q_proj"]), "lora", "b", targets=["q_proj"])
    layers = wrapped(model)
    assert len(layers) == 2 and all(set(w.adapters) == {"a", "b"} for w in layers.values())
    assert not any(isinstance(w.base_layer, AdaptedLayer) for w in layers.values())


def test_existing_name_is_an_error():
    model = adapt(tiny_llama(), "lora", "a", targets=["q_proj"])
    y = logits(model, X)
    with pytest.raises(lk.ConfigError, match="already has an adapter named 'a'"):
        lk.attach(model, lk.method_config("lora"), targets=["v_proj"], name="a")
    assert set(wrapped(model)) == set(find_targets(tiny_llama(), ["q_proj"]))
    assert torch.equal(logits(model, X), y)


@pytest.mark.parametrize("name", ["", "a.b", "1st", "has space", "x-y"])
def test_bad_adapter_name(name):
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match="adapter name"):
        lk.attach(model, lk.method_config("lora"), targets=["q_proj"], name=name)
    assert not has_wrappers(model) and lk.adapter_names(model) == []


def test_unknown_adapter_name_in_switch_and_delete():
    model = adapt(tiny_llama(), "lora", "a", targets=["q_proj"])
    for call in (lk.set_active, lk.delete_adapter):
        with pytest.raises(lk.ConfigError, match="no adapter named 'zz'.*'a'"):
            call(model, "zz")
    assert lk.active_adapter(model) == "a"


def test_set_active_none_runs_the_base():
    model = tiny_llama()
    y0 = logits(model, X)
    adapt(model, "lora", targets=["q_proj"])
    lk.set_active(model, None)
    assert torch.equal(logits(model, X), y0)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(lk.merge(model), X), y0)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"]])
def test_merge_with_tied_embeddings_changes_only_the_adapted_side(targets, tmp_path):
    model = tied_llama()
    embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    adapt(model, "lora", targets=targets)
    y = logits(model, X)
    merged = lk.merge(model)
    torch.testing.assert_close(logits(merged, X), y, atol=1e-5, rtol=1e-5)
    adapted_embed = targets == ["embed_tokens"]
    assert torch.equal(merged.lm_head.weight, head) == adapted_embed
    assert torch.equal(merged.model.embed_tokens.weight, embed) != adapted_embed
    bases = [m.base_layer if isinstance(m, AdaptedLayer) else m for m in (model.lm_head, model.model.embed_tokens)]
    assert bases[0].weight is bases[1].weight  # the original is still tied
    merged.tie_weights()  # re-tying must not undo the merge
    torch.testing.assert_close(logits(merged, X), y, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, X), y, atol=1e-5, rtol=1e-5)


def test_merge_inplace():
    model = adapt(tiny_gpt2(), "lora", targets=["c_attn", "wte"])
    y = logits(model, X)
    merged = lk.merge(model, inplace=True)
    assert merged is model and not has_wrappers(model) and lk.adapter_names(model) == []
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


def test_merge_refuses_a_method_that_is_not_mergeable(monkeypatch):
    import dataclasses

    monkeypatch.setitem(REGISTRY, "lora", dataclasses.replace(REGISTRY["lora"], mergeable=False))
    model = adapt(tiny_llama(), "lora", targets=["q_proj"])
    with pytest.raises(lk.ConfigError, match="'lora' cannot be merged"):
        lk.merge(model)
    assert has_wrappers(model)


@pytest.mark.parametrize(
    "builder, path, fields",
    [
        (tiny_llama, "model.layers.0.self_attn.q_proj", ("in_features", "out_features", "bias")),
        (tiny_gpt2, "transformer.h.0.attn.c_attn", ("nf", "bias")),
        (tiny_llama, "model.embed_tokens", ("num_embeddings", "embedding_dim", "padding_idx")),
    ],
    ids=["linear", "conv1d", "embedding"],
)
def test_adapted_layer_exposes_its_base(builder, path, fields):
    model = builder()
    base = model.get_submodule(path)
    lk.attach(model, lk.method_config("lora"), targets=path)
    wrapper = model.get_submodule(path)
    assert isinstance(wrapper, AdaptedLayer) and wrapper.base_layer is base
    assert wrapper.weight is base.weight
    for field in fields:
        got, want = getattr(wrapper, field), getattr(base, field)
        assert got is want or got == want, field
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute  # noqa: B018


def test_attach_freezes_the_base_and_returns_the_model():
    model = tiny_llama()
    assert lk.attach(model, lk.method_config("lora"), targets=["q_proj"]) is model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [n for n, _ in model.named_parameters() if ".adapters." not in n]


def test_methods_lists_the_registry():
    assert lk.methods() == sorted(REGISTRY) and {"lora", "dora"} <= set(lk.methods())


def test_attached_adapters_follow_the_models_mode():
    """On an eval model a freshly attached adapter is in eval mode too: no dropout at inference."""
    model = tiny_llama().eval()
    lk.attach(model, lk.method_config("lora", r=4, dropout=0.5), targets=["q_proj"])
    assert all(not m.training for m in model.modules())
    x = torch.randint(0, 256, (2, 5))
    randomize_adapters(model)
    torch.testing.assert_close(model(x).logits, model(x).logits)  # deterministic: dropout is off
    model.train()
    assert all(m.training for m in model.modules())


def test_a_method_refuses_a_layer_kind_it_does_not_support(monkeypatch):
    import dataclasses

    from lorakit.methods import REGISTRY

    monkeypatch.setitem(REGISTRY, "lora", dataclasses.replace(REGISTRY["lora"], layers=("linear", "conv1d")))
    model = tiny_llama()
    with pytest.raises(lk.TargetError, match=r"cannot wrap model\.embed_tokens \(Embedding\)"):
        lk.attach(model, lk.method_config("lora"), targets=["q_proj", "embed_tokens"])
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())  # nothing was wrapped
