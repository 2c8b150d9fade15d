"""Calibration plumbing: batch validation, full gradients and input activations against plain references,
and attach's calibration contract (required when the method needs data; a failed init leaves no trace)."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.init._calib import as_batches, full_gradients, input_activations
from lorakit.initialize import needs_calibration
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens


def batch(seed: int = 0, b: int = 2, t: int = 8, pad: int = 0) -> dict[str, torch.Tensor]:
    ids = tokens(b, t, seed=seed)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0  # right padding on the first row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize(
    "calibration, match",
    [
        (None, "no calibration batches"),
        ([], "empty"),
        ({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, "not a single dict"),
        (["text"], "batch 0 is a str"),
        ([batch(), {"attention_mask": torch.ones(2, 8)}], "batch 1 has no 'input_ids'"),
        ([{"input_ids": tokens(2, 8)}], "batch 0 has no 'labels'"),
        ([{**batch(), "labels": [1, 2]}], r"batch 0\['labels'\] is a list"),
        ([{"input_ids": torch.rand(2, 8), "labels": tokens(2, 8)}], "must be integer"),
        ([{**batch(), "attention_mask": torch.ones(2, 3)}], "attention_mask'] has shape"),
        ([batch(pad=3)], "hold 13 token rows but at least 14"),
    ],
)
def test_as_batches_errors_name_the_problem(calibration, match):
    with pytest.raises(lk.ConfigError, match=match) as e:
        as_batches(calibration, need_labels=True, min_rows=14, where="demo")
    assert str(e.value).startswith("demo")


def test_as_batches_materialises_iterables():
    batches = as_batches((batch(s) for s in range(3)), need_labels=False, min_rows=48, where="demo")
    assert len(batches) == 3 and all(torch.equal(b["input_ids"], batch(s)["input_ids"]) for s, b in enumerate(batches))


@pytest.mark.parametrize(
    "make, names",
    [
        (tiny_llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens"]),
        (tiny_gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.wte"]),
    ],
)
def test_full_gradients_equal_autograd_on_the_plain_base(make, names):
    batches = [batch(1, pad=2), batch(2)]
    ref_model = make()
    ref = {}
    for n in names:  # reference: .backward() of each batch's loss on the plain model, averaged, in (out, in)
        w = ref_model.get_submodule(n).weight
        w.requires_grad_(True)
    for b in batches:
        ref_model(**b).loss.backward()
    for n in names:
        module = ref_model.get_submodule(n)
        g = module.weight.grad / len(batches)
        ref[n] = g if isinstance(module, torch.nn.Linear) else g.T  # Conv1D / Embedding store (in, out)
    model = make()
    lk.attach(model, lk.method_config("lora", r=4), targets=[n.rsplit(".", 1)[1] for n in names])
    randomize_adapters(model)  # adapters are disabled for the gradient: they must not matter
    model.train()
    grads = full_gradients(model, names, batches)
    for n in names:
        torch.testing.assert_close(grads[n], ref[n], atol=1e-6, rtol=1e-5)
        assert grads[n].dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".adapters." in n}  # requires_grad restored
    assert model.training and lk.active_adapter(model) == "default"


def test_input_activations_are_the_layer_inputs_without_padding():
    model = tiny_gpt2()
    b = batch(3, pad=3)
    lk.attach(model, lk.method_config("lora", r=4), targets=["c_attn"])
    randomize_adapters(model)
    names = ["transformer.h.0.attn.c_attn"]
    rows = input_activations(model, names, [b])[names[0]]
    t = model.transformer  # reference: c_attn of block 0 sees ln_1(token + position embeddings)
    with torch.no_grad():
        h = t.h[0].ln_1(t.wte(b["input_ids"]) + t.wpe(torch.arange(8)))  # (B, T, d)
    keep = b["attention_mask"].bool()
    assert rows.shape == (int(keep.sum()), 64) == (13, 64)
    torch.testing.assert_close(rows, h[keep], atol=1e-6, rtol=1e-6)
    assert input_activations(model, names, [b], max_rows=5)[names[0]].shape == (5, 64)
    b["labels"][1, :4] = -100  # label_mask also drops ignored positions
    assert input_activations(model, names, [b], label_mask=True)[names[0]].shape == (9, 64)
    with pytest.raises(lk.TargetError, match="embedding"):
        input_activations(model, ["transformer.wte"], [b])


def test_attach_requires_calibration_for_data_inits_and_leaves_no_trace_on_failure():
    method = "lora_ga"  # needs calibration with labels
    assert needs_calibration(lk.REGISTRY["lora"], lk.method_config("lora", init=method))
    model = tiny_llama()
    x = tokens()
    y0 = logits(model, x)
    with pytest.raises(lk.ConfigError, match="initialises from data; pass calibration=batches"):
        lk.attach(model, lk.method_config("lora", r=4, init=method))
    lk.attach(model, lk.method_config("lora", r=4), name="first")
    randomize_adapters(model)
    y1 = logits(model, x)
    for bad in ([], [{"input_ids": tokens()}], 42):  # empty, no labels, not an iterable
        with pytest.raises(lk.ConfigError, match=method if bad != 42 else "iterable"):
            lk.attach(model, lk.method_config("lora", r=4, init=method), name="second", calibration=bad)
        assert lk.adapter_names(model) == ["first"] and lk.active_adapter(model) == "first"
        assert torch.equal(logits(model, x), y1)
    lk.delete_adapter(model, "first")
    assert torch.equal(logits(model, x), y0)
