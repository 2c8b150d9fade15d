"""LoTR: ΔW_l = s·U·G_l·Vᵀ with one U and one V (one parameter each) shared by the layers of a shape group;
trainable params = 2·d·r + L·r² for L layers of one shape; merge exact; groups never span two attaches; the
saved dir holds U and V once per group and loads back shared."""

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()
SQUARE = ["q_proj", "o_proj"]  # 64 → 64 in both blocks of tiny Llama: L = 4 layers of one shape


def adapters(model, name: str = "default"):
    return [w.adapters[name] for _, w in wrappers(model)]


def test_one_shared_u_and_v_and_the_paper_parameter_count():
    r = 4
    model = tiny_llama()
    lk.attach(model, lk.method_config("lotr", r=r, alpha=2.0), targets=SQUARE)
    randomize_adapters(model, std=0.3)
    layers = adapters(model)
    assert (
        len(layers) == 4 and len({id(a.shared.U) for a in layers}) == 1 and len({id(a.shared.V) for a in layers}) == 1
    )
    trainable = [p for p in model.parameters() if p.requires_grad]  # each shared tensor counted once
    assert len(trainable) == 2 + len(layers)
    assert sum(p.numel() for p in trainable) == 2 * 64 * r + len(layers) * r * r  # 2dr + L·r²
    U, V = layers[0].shared.U, layers[0].shared.V
    for (_, w), a in zip(wrappers(model), layers, strict=True):  # ΔW_l = s·U·G_l·Vᵀ
        torch.testing.assert_close(a.delta_weight(w.base_layer), 0.5 * U @ a.G @ V.T)


def test_shape_groups_on_a_whole_model_and_merge_is_exact():
    model = tiny_llama()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("lotr", r=4), targets="all-linear")
    assert torch.equal(logits(model, X), y0)  # G_l = 0
    groups = {}
    for _, w in wrappers(model):
        groups.setdefault(L.dims(w.base_layer), set()).add(id(w.adapters["default"].shared))
    assert sorted(groups) == [(64, 32), (64, 64), (64, 128), (128, 64)] and all(len(g) == 1 for g in groups.values())
    expected = sum(4 * (d_in + d_out) for d_in, d_out in groups) + 14 * 16  # per group 2dr-like, per layer r²
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    randomize_adapters(model, std=0.1)
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


def test_every_layer_trains_the_one_shared_u():
    model = tiny_llama()
    lk.attach(model, lk.method_config("lotr", r=4), targets=SQUARE)
    randomize_adapters(model, std=0.1)
    model.train()
    model(X, labels=X).loss.backward()
    U = adapters(model)[0].shared.U
    per_layer = [
        torch.autograd.grad(a.delta_weight(w.base_layer).sum(), U)[0]
        for (_, w), a in zip(wrappers(model), adapters(model), strict=True)
    ]
    assert U.grad is not None and all(g.abs().sum() > 0 for g in per_layer)  # every layer reaches the one U


def test_a_second_attach_never_joins_the_first_ones_groups():
    cfg = lk.method_config("lotr", r=4)
    model = tiny_llama()
    lk.attach(model, cfg, targets=SQUARE, name="a")
    lk.attach(model, cfg, targets=SQUARE, name="b")  # the same config object, the same layers
    other = lk.attach(tiny_llama(), cfg, targets=SQUARE)  # ... and another model
    a, b, c = ({id(x.shared) for x in adapters(m, n)} for m, n in ((model, "a"), (model, "b"), (other, "default")))
    assert len(a) == len(b) == len(c) == 1 and len(a | b | c) == 3


@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "wte"])])
def test_saved_dir_holds_each_group_once_and_loads_back_shared(make, targets, tmp_path):
    model = make()
    lk.attach(model, lk.method_config("lotr", r=4), targets=targets)
    randomize_adapters(model, std=0.1)
    y = logits(model, X)
    lk.save_adapter(model, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    n_groups = len({id(a.shared) for a in adapters(model)})
    assert sum(k.endswith("lotr_U") for k in keys) == sum(k.endswith("lotr_V") for k in keys) == n_groups
    assert sum(k.endswith("lotr_G") for k in keys) == len(adapters(model))
    loaded = lk.load_adapter(make(), tmp_path / "a")
    assert len({id(a.shared) for a in adapters(loaded)}) == n_groups
    torch.testing.assert_close(logits(loaded, X), y, atol=1e-6, rtol=0)


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("lotr", r=0)
