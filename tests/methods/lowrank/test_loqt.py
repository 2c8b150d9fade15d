"""LoQT: P is the top-r left singular subspace of the full gradient, the model starts as the base, and a fold
W ← Q(W + s·P·B), B ← 0 (the loqt callback, every merge_every steps) keeps the outputs within the quantization
tolerance on an NF4 base (exactly on a full-precision one)."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.init._calib import full_gradients
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks import build_callbacks
from lorakit.train.callbacks._api import TrainState
from tests.helpers import logits, tokens

X = tokens()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_HALF_GAP = 0.152  # half the widest gap of the NF4 grid (−1 → −0.6962): |Q(v) − v| ≤ that × the block's absmax


def calibration() -> list[dict[str, torch.Tensor]]:
    ids = tokens(batch=4, length=8, seed=7)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def adapted(model: torch.nn.Module, **opts) -> torch.nn.Module:
    torch.manual_seed(0)
    return lk.attach(model, lk.method_config("loqt", r=4, **opts), targets=TARGETS, calibration=calibration())


def test_p_spans_the_top_gradient_directions_and_the_model_starts_as_the_base():
    y0 = logits(tiny_llama(0), X)
    names = [n for n, _ in wrappers(adapted(tiny_llama(0)))]
    grads = full_gradients(tiny_llama(0), names, calibration())
    model = adapted(tiny_llama(0))
    torch.testing.assert_close(logits(model, X), y0, atol=1e-6, rtol=0)
    for name, w in wrappers(model):
        P = w.adapters["default"].P.double()  # (out, 4)
        U = torch.linalg.svd(grads[name].double(), full_matrices=False)[0][:, :4]
        torch.testing.assert_close((P.T @ U).abs(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.equal(w.adapters["default"].B, torch.zeros_like(w.adapters["default"].B))


def test_a_fold_on_nf4_stays_within_the_quantization_tolerance():
    model = adapted(lk.quantize(tiny_llama(0), "nf4"))
    randomize_adapters(model, seed=1, std=0.05)
    y = logits(model, X)
    requantized = logits(lk.merge(model), X)  # lk.merge's re-quantized merge: the same Q(W_q + ΔW)
    for _, w in wrappers(model):
        a, base = w.adapters["default"], w.base_layer
        with torch.no_grad():
            target = L.weight_out_in(base).float() + a.delta_weight(base).float()  # (out, in): W_q + s·P·B
        a.fold(base)
        assert torch.equal(a.B, torch.zeros_like(a.B)) and L.is_quantized(base)
        err = (L.weight_out_in(base) - target).flatten().view(-1, 64)  # bitsandbytes' blocks of 64
        bound = NF4_HALF_GAP * target.flatten().view(-1, 64).abs().amax(1, keepdim=True)
        assert bool((err.abs() <= bound + 1e-6).all())
    after = logits(model, X)
    torch.testing.assert_close(after, requantized, atol=1e-6, rtol=0)
    # on the logits a fold costs about what quantizing the base cost in the first place (measured 0.088 vs 0.069,
    # and 0.9-1.8x that over seeds 1-3), so the bound is twice the base's own NF4 error
    base_error = float((logits(lk.quantize(tiny_llama(0), "nf4"), X) - logits(tiny_llama(0), X)).abs().max())
    assert 0 < float((after - y).abs().max()) <= 2 * base_error


def test_a_fold_on_a_full_precision_base_is_exact():
    model = adapted(tiny_llama(0))
    randomize_adapters(model, seed=1, std=0.05)
    y = logits(model, X)
    for _, w in wrappers(model):
        w.adapters["default"].fold(w.base_layer)
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
    with lk.disabled(model) as m:  # the update now lives in the base
        torch.testing.assert_close(logits(m, X), y, atol=1e-5, rtol=1e-5)


def test_the_callback_folds_every_merge_every_steps_and_restarts_b():
    model = adapted(lk.quantize(tiny_llama(0), "nf4"), merge_every=2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), config=None)  # type: ignore[arg-type]
    callbacks = build_callbacks(("loqt",))
    base_error = float((logits(lk.quantize(tiny_llama(0), "nf4"), X) - logits(tiny_llama(0), X)).abs().max())
    first = next(w for _, w in wrappers(model))
    codes = first.base_layer.weight.detach().clone()
    for step in (1, 2, 3):
        model.train()
        model(X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
        state.step = step
        y = logits(model, X)
        callbacks.on_step_end(state)
        B = first.adapters["default"].B
        if step == 2:  # folded: B is 0, its moments are gone, the codes changed, the outputs barely moved
            assert torch.equal(B, torch.zeros_like(B)) and B not in opt.state
            assert not torch.equal(first.base_layer.weight, codes)
            assert float((logits(model, X) - y).abs().max()) <= 2 * base_error
        else:
            assert B.abs().sum() > 0 and B in opt.state


def test_a_fold_takes_p_again_from_the_fold_steps_own_gradient():
    model = adapted(tiny_llama(0), merge_every=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    state = TrainState(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), config=None)  # type: ignore[arg-type]
    callbacks = build_callbacks(("loqt",))
    bases = {n: w.base_layer for n, w in wrappers(model)}
    for base in bases.values():  # the reference: autograd's own ∇_W of the same step
        base.weight.requires_grad_(True)
    callbacks.on_step_begin(state)
    model.train()
    model(X, labels=X).loss.backward()
    opt.step()
    G = {n: b.weight.grad.clone() for n, b in bases.items()}  # (out, in)
    old = {n: w.adapters["default"].P.clone() for n, w in wrappers(model)}
    state.step = 1
    callbacks.on_step_end(state)
    for name, w in wrappers(model):
        P = w.adapters["default"].P.double()  # (out, 4)
        U = torch.linalg.svd(G[name].double(), full_matrices=False)[0][:, :4]
        torch.testing.assert_close((P.T @ U).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
        assert not torch.allclose(P.float(), old[name])  # a new subspace


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="merge_every must be a positive integer"):
        lk.method_config("loqt", merge_every=0)
    with pytest.raises(lk.ConfigError, match="initialises from data"):
        lk.attach(tiny_llama(0), lk.method_config("loqt", r=4), targets=TARGETS)
