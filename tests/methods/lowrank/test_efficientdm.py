"""EfficientDM (methods/lowrank/efficientdm.py): the forward is Q_t(W + s·B·A) with LSQ step sizes per timestep,
round() straight-through, and int8 codes · Δ_t reproduce the forward bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.methods.lowrank.efficientdm import Efficientdm, set_timestep


def adapted(base: nn.Module, seed: int = 0, **opts) -> tuple[nn.Sequential, Efficientdm]:
    torch.manual_seed(seed)
    model = lk.attach(
        nn.Sequential(base), lk.method_config("efficientdm", **{"r": 2, "alpha": 4.0, **opts}), targets=["0"]
    )
    adapter: Efficientdm = model[0].adapters["default"]
    with torch.no_grad():
        adapter.B.normal_(std=0.05)  # a trained-looking B, so s·B·A moves codes
    return model, adapter


def by_hand(W: torch.Tensor, A, B, s: float, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Δ·clamp(round((W + s·B·A)/Δ), −2^(b−1), 2^(b−1)−1) per output row, (out, in)."""
    v = (W + s * (B @ A)) / step[:, None]
    return step[:, None] * torch.clamp(torch.round(v), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


LAYERS = {
    "linear": lambda: nn.Linear(12, 6),
    "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1, stride=2),
}
INPUTS = {"linear": lambda: torch.randn(4, 12), "conv2d": lambda: torch.randn(2, 3, 7, 7)}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_forward_is_the_fake_quantized_merged_weight(kind, bits):
    torch.manual_seed(1)
    base = LAYERS[kind]()
    ref = LAYERS[kind]()
    ref.load_state_dict(base.state_dict())
    model, a = adapted(base, bits=bits)
    W = ref.weight.detach().flatten(1)  # (out, in·kh·kw)
    assert torch.equal(a.step[0], W.abs().amax(1) / (2 ** (bits - 1) - 1))  # Δ = max|W_row| / Q_p at init
    expected = by_hand(W, a.A, a.B, 2.0, a.step[0], bits)
    x = INPUTS[kind]()
    with torch.no_grad():
        ref.weight.copy_(expected.view_as(ref.weight))
        torch.testing.assert_close(model(x), ref(x), atol=1e-6, rtol=0)
    q = (expected / a.step[0][:, None]).detach()  # the integer grid, up to the division's rounding
    assert (q - q.round()).abs().max() < 1e-4 and len(torch.unique(q.round())) <= 2**bits
    with torch.no_grad():
        y = model(x)
    assert torch.equal(model(x).detach(), y)  # the training path (fused_forward) gives the same values


def test_ste_and_lsq_gradients_match_the_hand_formula():
    torch.manual_seed(2)
    base = nn.Linear(3, 2, bias=False)
    model, a = adapted(base, bits=2)
    with torch.no_grad():
        a.step[0].copy_(torch.tensor([0.2, 0.05]))  # row 1: small steps, so some of its weights clip
    x = torch.randn(5, 3)
    g_out = torch.randn(5, 2)
    (model(x) * g_out).sum().backward()
    w = base.weight.detach() + 2.0 * (a.B @ a.A).detach()  # (2, 3)
    v = w / a.step[0].detach()[:, None]
    c = torch.clamp(torch.round(v), -2, 1)
    inside = (v >= -2) & (v <= 1)
    assert inside.any() and not inside.all()
    g_wq = g_out.T @ x  # ∂L/∂Q(w), (2, 3)
    g_w = g_wq * inside  # straight through inside the grid, zero where clipped
    torch.testing.assert_close(a.A.grad, 2.0 * a.B.detach().T @ g_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.B.grad, 2.0 * g_w @ a.A.detach().T, atol=1e-6, rtol=1e-5)
    lsq = (g_wq * torch.where(inside, c - v, c)).sum(1) / math.sqrt(3 * 1)  # grad scale 1/sqrt(in·Q_p)
    torch.testing.assert_close(a.step[0].grad, lsq, atol=1e-6, rtol=1e-5)
    for p in (a.A.grad, a.B.grad, a.step[0].grad):
        assert torch.isfinite(p).all() and p.abs().sum() > 0


def test_each_timestep_uses_only_its_own_step_sizes():
    torch.manual_seed(3)
    base = nn.Conv2d(2, 4, 3, padding=1)
    model, a = adapted(base, bits=4, timesteps=3)
    with torch.no_grad():
        for t in range(3):
            a.step[t].mul_(1 + 0.5 * t)
    x = torch.randn(2, 2, 5, 5)
    outs = []
    for t in range(3):
        assert set_timestep(model, t) == 1 and a.timestep == t
        W = L.weight_out_in(base)
        expected = base._conv_forward(x, by_hand(W, a.A, a.B, 2.0, a.step[t], 4).view_as(base.weight), base.bias)
        outs.append(model(x))
        torch.testing.assert_close(outs[-1], expected, atol=1e-6, rtol=0)
        model.zero_grad(set_to_none=True)
        outs[-1].square().sum().backward()
        assert [s.grad is not None for s in a.step] == [i == t for i in range(3)]  # only step sizes t train
    assert (outs[0] - outs[2]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_integer_codes_times_scales_reproduce_the_forward_exactly(kind):
    torch.manual_seed(4)
    base = LAYERS[kind]()
    model, a = adapted(base, bits=4, timesteps=2)
    with torch.no_grad():
        a.step[1].mul_(0.7)
    x = INPUTS[kind]()
    for t in range(2):
        set_timestep(model, t)
        codes, scale = a.to_integer(base)
        assert codes.dtype == torch.int8 and scale.shape == (codes.shape[0], 1)
        assert codes.min() >= -8 and codes.max() <= 7
        plain = LAYERS[kind]()
        with torch.no_grad():
            plain.weight.copy_(L.to_base_layout(base, codes.float() * scale))
            plain.bias.copy_(base.bias)
            assert torch.equal(plain(x), model(x))  # bit for bit
            merged = lk.merge(model)  # the active timestep's Q_t(W + s·B·A), as W + ΔW
            torch.testing.assert_close(merged(x), model(x), atol=1e-6, rtol=0)


def test_save_and_load_keep_every_timestep(tmp_path):
    model, a = adapted(nn.Linear(8, 4), timesteps=2)
    with torch.no_grad():
        a.step[1].mul_(0.5)
    lk.save_adapter(model, tmp_path / "a")
    torch.manual_seed(9)
    loaded = lk.load_adapter(nn.Sequential(model[0].base_layer), tmp_path / "a")
    x = torch.randn(3, 8)
    for t in range(2):
        set_timestep(model, t), set_timestep(loaded, t)
        assert torch.equal(loaded(x), model(x))


def test_bad_input_fails_clearly():
    for bits in (1, 9, 3.5):
        with pytest.raises(lk.ConfigError, match="bits must be an integer from 2 to 8"):
            lk.method_config("efficientdm", bits=bits)
    with pytest.raises(lk.ConfigError, match="timesteps must be a positive integer"):
        lk.method_config("efficientdm", timesteps=0)
    model, _ = adapted(nn.Linear(4, 4), timesteps=3)
    for t in (3, -1, 1.0):
        with pytest.raises(lk.ConfigError, match=r"timestep must be an integer in \[0, 3\)"):
            set_timestep(model, t)
    with pytest.raises(lk.ConfigError, match=r"timestep must be in \[0, 3\)"):
        model[0].adapters["default"].to_integer(model[0].base_layer, 3)
    with pytest.raises(lk.ConfigError, match="found no efficientdm adapter"):
        set_timestep(nn.Linear(2, 2), 0)
    with pytest.raises(lk.ConfigError, match="groups=2"):
        adapted(nn.Conv2d(4, 4, 3, groups=2))
