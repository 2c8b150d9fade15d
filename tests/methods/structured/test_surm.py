"""SURM: circulant / Toeplitz / Σ circulant·skew-circulant ΔW built from the generators equals the textbook dense
construction; the FFT matvec equals the dense matvec; the (Z₁, Z₋₁) displacement rank is 1 / ≤ 2 / r and the
parameter count is the displacement-rank formula 2·r·n; every structure starts at ΔW = 0, merges and round-trips."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.structured.surm import Surm
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

X = tokens()
STRUCTURES = ["circulant", "toeplitz", "ldr"]
SHAPES = [(16, 16), (24, 10), (10, 24)]  # (in, out): square, wide, tall


def noisy(d_in: int, d_out: int, **opts) -> tuple[nn.Linear, Surm]:
    base = nn.Linear(d_in, d_out).double()
    adapter = Surm.from_base(base, lk.method_config("surm", **opts))
    randomize_adapters(adapter, std=0.5)
    return base, adapter


def circulant(c: torch.Tensor) -> torch.Tensor:
    """Column j is c shifted down by j (first column c)."""
    return torch.stack([torch.roll(c, j) for j in range(c.numel())], 1)


def skew_circulant(h: torch.Tensor) -> torch.Tensor:
    """Column j is h shifted down by j, with the entries that wrapped around negated."""
    cols = []
    for j in range(h.numel()):
        col = torch.roll(h, j).clone()
        col[:j] = -col[:j]
        cols.append(col)
    return torch.stack(cols, 1)


def reference(adapter: Surm) -> torch.Tensor:
    """The dense ΔW from its generators by the textbook definitions, cropped to (out, in)."""
    g, d_in, d_out = adapter.generators, adapter.d_in, adapter.d_out
    if adapter.config.structure == "toeplitz":
        t = g["t"]
        full = torch.stack([torch.stack([t[i - j + d_in - 1] for j in range(d_in)]) for i in range(d_out)])
    elif adapter.config.structure == "circulant":
        full = circulant(g["c"])
    else:
        full = sum(circulant(gk) @ skew_circulant(hk) for gk, hk in zip(g["g"], g["h"], strict=True))
    return adapter.config.alpha * full[:d_out, :d_in]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_delta_from_generators_equals_the_dense_construction_and_fft_matvec_equals_dense(structure, shape):
    base, adapter = noisy(*shape, structure=structure, r=3, alpha=0.7)
    with torch.no_grad():
        delta = adapter.delta_weight(base)
        torch.testing.assert_close(delta, reference(adapter))
        x = torch.randn(4, 5, shape[0], dtype=torch.float64)
        fast = adapter(x, base, base(x)) - base(x)  # FFT path (float32 inside)
        torch.testing.assert_close(fast, x @ delta.T, atol=1e-5, rtol=1e-5)


def shift(n: int, f: float) -> torch.Tensor:
    """Z_f: ones on the subdiagonal and f in the top-right corner."""
    Z = torch.diag(torch.ones(n - 1, dtype=torch.float64), -1)
    Z[0, -1] = f
    return Z


@pytest.mark.parametrize("structure, r, rank", [("circulant", 1, 1), ("toeplitz", 1, 2), ("ldr", 1, 1), ("ldr", 3, 3)])
def test_displacement_rank_and_the_displacement_rank_parameter_formula(structure, r, rank):
    n = 12
    base, adapter = noisy(n, n, structure=structure, r=r)
    with torch.no_grad():
        W = adapter.delta_weight(base)
    displacement = shift(n, 1) @ W - W @ shift(n, -1)  # ∇_{Z₁,Z₋₁}(ΔW)
    assert torch.linalg.matrix_rank(displacement) == rank
    assert torch.linalg.matrix_rank(W) == n  # unrestricted rank: full, unlike LoRA
    expected = {"circulant": n, "toeplitz": 2 * n - 1, "ldr": 2 * r * n}[structure]
    assert sum(p.numel() for p in adapter.parameters()) == expected


@pytest.mark.parametrize("structure", STRUCTURES)
def test_param_count_matches_the_formula_on_a_model(structure):
    model = tiny_llama()
    cfg = lk.method_config("surm", structure=structure, r=2)
    lk.attach(model, cfg, targets="all-linear")
    for _, w in wrappers(model):
        d_in, d_out = L.dims(w.base_layer)
        n, real = max(d_in, d_out), sum(p.numel() for p in w.adapters["default"].parameters())
        assert real == {"circulant": n, "toeplitz": d_in + d_out - 1, "ldr": 4 * n}[structure]
        assert real == lk.REGISTRY["surm"].param_count(d_in, d_out, cfg)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_every_structure_starts_at_the_base_merges_and_round_trips(structure, make, tmp_path):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("surm", structure=structure, r=2), targets="all-linear")
    assert torch.equal(logits(model, X), y0)
    randomize_adapters(model, std=0.05)
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)
    lk.save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(logits(lk.load_adapter(make(), tmp_path / "a"), X), y, atol=1e-6, rtol=0)


def test_bad_options_and_layers_are_clear_errors():
    with pytest.raises(lk.ConfigError, match="structure must be one of"):
        lk.method_config("surm", structure="kronecker")
    with pytest.raises(lk.TargetError, match="surm.*wte"):
        lk.attach(tiny_gpt2(), lk.method_config("surm"), targets=["wte"])
