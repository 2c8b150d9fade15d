"""SingLoRA: ΔW = u(t)·(α/r)·A·Aᵀ (truncated A on the smaller side of a rectangular W), ramp u(t) = min(t/T, 1)
starting at 0, r·max(d_in, d_out) parameters (half of LoRA on a square layer), merged = unmerged."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.singlora import SingLora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()


def trained(adapter: SingLora, steps: int) -> SingLora:
    """Noise on A and the ramp moved to step ``steps`` (what training would leave)."""
    randomize_adapters(adapter, std=0.3)
    adapter.set_step(steps)
    return adapter.eval()  # a module starts in training mode, where each forward is a training step


@pytest.mark.parametrize("d_in, d_out", [(24, 24), (16, 24), (24, 16)])
def test_delta_is_the_ramped_symmetric_product_truncated_on_the_smaller_side(d_in, d_out):
    base = nn.Linear(d_in, d_out)
    adapter = trained(SingLora.from_base(base, lk.method_config("singlora", r=4, alpha=8.0, ramp_steps=10)), 5)
    A = adapter.A.detach()  # (max(d_in, d_out), r)
    assert A.shape == (max(d_in, d_out), 4)
    full = A @ A.T  # (n, n), symmetric
    expected = 0.5 * (8.0 / 4) * full[:d_out, :d_in]  # u = 5/10, s = α/r; the truncated variant is a corner of A·Aᵀ
    torch.testing.assert_close(adapter.delta_weight(base), expected)
    if d_in == d_out:
        torch.testing.assert_close(adapter.delta_weight(base), adapter.delta_weight(base).T)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x) + x @ expected.T, atol=1e-6, rtol=1e-5)


def test_ramp_starts_at_zero_and_rises_one_step_per_training_forward_to_one():
    base = nn.Linear(8, 8)
    adapter = SingLora.from_base(base, lk.method_config("singlora", r=2, ramp_steps=4)).eval()
    x = torch.randn(5, 8)
    y = base(x)
    assert adapter.A.abs().sum() > 0  # A is random (a zero A would never get a gradient) ...
    assert torch.equal(adapter(x, base, y), y)  # ... yet at t = 0 the layer is the base exactly
    ramps = []
    adapter.train()
    for _ in range(6):
        adapter(x, base, y)
        ramps.append(float(adapter.ramp()))
    assert ramps == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    adapter.eval()
    adapter(x, base, y)
    with torch.no_grad():
        adapter.train()(x, base, y)
    assert int(adapter.step) == 6  # evaluation and no-grad forwards do not count as training steps
    off = SingLora.from_base(base, lk.method_config("singlora", r=2, ramp_steps=0))
    assert float(off.ramp()) == 1.0


def test_first_training_step_gets_a_gradient_and_training_moves_the_model():
    model = tiny_llama()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("singlora", r=4, ramp_steps=2), targets="all-linear")
    torch.testing.assert_close(logits(model, X), y0, atol=0, rtol=0)  # identity at init
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(X, labels=X).loss.backward()
        assert all(w.adapters["default"].A.grad.abs().sum() > 0 for _, w in wrappers(model))
        opt.step()
    model.eval()
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_step_and_a_are_saved_so_a_reloaded_adapter_gives_the_same_outputs(make, tmp_path):
    model = make()
    targets = ["q_proj", "down_proj", "embed_tokens"] if make is tiny_llama else ["c_attn", "c_fc", "wte"]
    lk.attach(model, lk.method_config("singlora", r=4, ramp_steps=10), targets=targets)
    for _, w in wrappers(model):
        trained(w.adapters["default"], 7)
    y = logits(model, X)
    assert (y - logits(make(), X)).abs().max() > 1e-3
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(make(), tmp_path / "a")
    assert {int(w.adapters["default"].step) for _, w in wrappers(loaded)} == {7}
    torch.testing.assert_close(logits(loaded, X), y, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(lk.merge(loaded), X), y, atol=1e-5, rtol=1e-5)


def test_parameter_count_is_r_times_the_larger_side_half_of_lora_on_square_layers():
    counts = {}
    for method in ("singlora", "lora"):
        model = tiny_llama()
        lk.attach(model, lk.method_config(method, r=8), targets="all-linear")
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method == "singlora":
            assert counts[method] == sum(8 * max(L.dims(w.base_layer)) for _, w in wrappers(model))
            names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
            assert names == {"A"}  # one matrix per layer; the step counter is a buffer
    # q_proj and o_proj are square (64×64): 512 SingLoRA vs 1024 LoRA parameters each
    square = nn.Linear(64, 64)
    assert sum(p.numel() for p in SingLora.from_base(square, lk.method_config("singlora", r=8)).parameters()) == 512
    assert counts["singlora"] < counts["lora"]


def test_wraps_conv1d_and_embeddings_in_their_own_layouts():
    torch.manual_seed(0)
    for base in (Conv1D(24, 16), nn.Embedding(50, 24)):
        adapter = trained(SingLora.from_base(base, lk.method_config("singlora", r=3, ramp_steps=1)), 1)
        d_in, d_out = L.dims(base)
        x = torch.randint(0, 50, (2, 5)) if isinstance(base, nn.Embedding) else torch.randn(2, 5, 16)
        merged = L.weight_out_in(base).detach() + L.to_base_layout(base, adapter.delta_weight(base)).detach()
        expected = merged.T[x] if isinstance(base, nn.Embedding) else x @ merged.T + base.bias
        torch.testing.assert_close(adapter(x, base, base(x)), expected, atol=1e-5, rtol=1e-5)


def test_bad_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("singlora", r=0)
    with pytest.raises(lk.ConfigError, match="ramp_steps must be an integer >= 0"):
        lk.method_config("singlora", ramp_steps=-1)
    with pytest.raises(lk.ConfigError, match="dropout"):
        lk.method_config("singlora", dropout=1.0)
