"""training_loss equals model(**batch).loss (value and every adapter gradient) and falls back where it must."""

import pytest
import torch

import lorakit as lk
import lorakit.train.loss as loss_module
from lorakit.models.heads import contiguous_head
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.train.loss import LinearCrossEntropyFn, fused_head, training_loss


def adapted(targets="all-linear"):
    model = tiny_llama(0)
    lk.attach(model, lk.method_config("lora", r=4), targets=targets)
    randomize_adapters(model, seed=1, std=0.1)
    return model


def batch(seed=0):
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, fn, b):
    loss = fn(model, b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [300, 1 << 25])  # many row chunks, and one
def test_fused_loss_equals_the_models_loss_and_gradients(chunk, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk)
    model, b = adapted(), batch()
    assert fused_head(model) is model.lm_head
    want, want_grads = loss_and_grads(model, lambda m, x: m(**x).loss, b)
    got, got_grads = loss_and_grads(model, training_loss, b)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_linear_cross_entropy_gradient_scales_with_the_upstream_gradient():
    torch.manual_seed(0)
    h, W, bias = torch.randn(7, 5, requires_grad=True), torch.randn(11, 5), torch.randn(11)
    labels = torch.tensor([1, -100, 3, 10, 0, -100, 4])
    (3.0 * LinearCrossEntropyFn.apply(h, W, bias, labels)).backward()
    ours = h.grad.clone()
    h.grad = None
    (3.0 * torch.nn.functional.cross_entropy(h @ W.T + bias, labels)).backward()
    torch.testing.assert_close(ours, h.grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no gradient wanted: the loss alone
        assert torch.isclose(
            LinearCrossEntropyFn.apply(h, W, bias, labels), torch.nn.functional.cross_entropy(h @ W.T + bias, labels)
        )


def test_the_models_own_path_where_fusing_does_not_apply():
    assert fused_head(adapted(targets=["q_proj", "lm_head"])) is None  # an adapted head
    assert fused_head(tiny_gpt2(0)) is None  # not a listed architecture
    trained_head = adapted()
    trained_head.lm_head.weight.requires_grad_(True)
    assert fused_head(trained_head) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_head(adapted()) is None
    hooked = adapted()
    hooked.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))  # changes values: not fusable
    assert fused_head(hooked) is None
    served = contiguous_head(adapted())  # the serving engine's hook only lays the input out
    assert fused_head(served) is served.lm_head
    model, b = adapted(), batch()
    b["labels"][:] = -100  # nothing supervised: the model's own answer, a NaN loss and zero gradients
    want, want_grads = loss_and_grads(model, lambda m, x: m(**x).loss, b)
    got, got_grads = loss_and_grads(model, training_loss, b)
    assert torch.isnan(want) and torch.isnan(got)
    for name in want_grads:
        assert not want_grads[name].any() and not got_grads[name].any(), name
