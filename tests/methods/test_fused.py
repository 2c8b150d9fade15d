"""The fused LoRA training node equals autograd on the plain chain: outputs and every gradient;
its dropout draws i.i.d. Bernoulli(p) positions (nn.Dropout's distribution) and stays unbiased."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.methods._fused import LoraLinearFn, drop_positions


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """The float keep-mask the fused node draws next from torch's default generator."""
    keep = torch.ones(math.prod(shape))
    keep[drop_positions(keep.numel(), p)] = 0.0
    return keep.view(shape)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_the_unfused_chain(p, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    A = (torch.randn(4, 24) * 0.1).requires_grad_()
    B = (torch.randn(40, 4) * 0.1).requires_grad_()
    x0 = torch.randn(3, 5, 24)
    weights = torch.linspace(-1, 1, 40)  # a non-uniform upstream gradient
    results = []
    for fused in (False, True):
        torch.manual_seed(1)  # the same dropout draws on both sides
        x = x0.clone().requires_grad_()
        if fused:
            y = LoraLinearFn.apply(x, base.weight, base.bias, A, B, 2.0, p)
        else:
            dropped = x * keep_mask(x.shape, p) / (1 - p) if p > 0 else x
            y = base(x) + F.linear(F.linear(dropped, A), B) * 2.0
        (y * weights).sum().backward()
        results.append((y.detach(), x.grad, A.grad.clone(), B.grad.clone()))
        A.grad = B.grad = None
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_lora_uses_the_fused_node_only_where_it_applies():
    import lorakit as lk
    from lorakit.testing import tiny_llama

    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=4), targets=["q_proj", "embed_tokens"])
    q = model.model.layers[0].self_attn.q_proj
    emb = model.model.embed_tokens
    x = torch.randn(2, 3, 64)
    assert q.adapters["default"].fused_forward(x, q.base_layer) is not None  # frozen Linear, grad on
    with torch.no_grad():
        assert q.adapters["default"].fused_forward(x, q.base_layer) is None  # inference: the in-place path
    assert emb.adapters["default"].fused_forward(torch.tensor([[1, 2]]), emb.base_layer) is None
    q.base_layer.weight.requires_grad_(True)  # a trainable base weight needs autograd's own graph
    assert q.adapters["default"].fused_forward(x, q.base_layer) is None


def test_drop_positions_are_an_iid_bernoulli_draw():
    n, p, draws = 400, 0.05, 3000
    torch.manual_seed(0)
    counts = torch.zeros(n)
    gaps_of_one = gaps = 0
    for _ in range(draws):
        idx = drop_positions(n, p)
        assert (
            idx.dtype == torch.long and (idx[1:] > idx[:-1]).all() and (idx.numel() == 0 or 0 <= idx[0] <= idx[-1] < n)
        )
        counts[idx] += 1
        diffs = idx.diff()
        gaps_of_one, gaps = gaps_of_one + int((diffs == 1).sum()), gaps + diffs.numel()
    total = counts.sum()
    assert abs(total / (n * draws) - p) < 4 * math.sqrt(p * (1 - p) / (n * draws))  # the rate is p
    chi2 = float(((counts - draws * p) ** 2 / (draws * p * (1 - p))).sum())  # each position alike
    assert abs(chi2 - n) < 5 * math.sqrt(2 * n)
    assert counts[-20:].mean() / draws == pytest.approx(p, abs=0.012)  # the end of the range too
    assert gaps_of_one / gaps == pytest.approx(p, abs=0.01)  # independence: a drop after a drop has rate p


def test_drop_positions_edge_cases():
    assert drop_positions(0, 0.5).numel() == 0 and drop_positions(10, 0.0).numel() == 0
    assert drop_positions(10**6, 1e-300).numel() == 0  # gaps beyond n are clamped, not overflowed
    torch.manual_seed(0)
    assert drop_positions(3, 0.999999).tolist() == [0, 1, 2]
    torch.manual_seed(1)
    first = drop_positions(1000, 0.3)
    torch.manual_seed(1)
    assert torch.equal(first, drop_positions(1000, 0.3))  # seeded: the same draw
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            drop_positions(10, bad)


def test_a_uniform_draw_of_zero_drops_nothing_rather_than_overflowing(monkeypatch):
    """V = 0 (odds 2⁻⁵³ per draw) gives log V = -inf: the gap is clamped to n + 1, past the range."""
    monkeypatch.setattr(torch, "rand", lambda m, dtype=None, device=None: torch.zeros(m, dtype=dtype))
    assert drop_positions(1000, 0.3).numel() == 0


def test_fused_dropout_is_unbiased_and_drops_at_rate_p():
    torch.manual_seed(0)
    W, A, B = torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3)
    x = torch.randn(50, 8)
    exact = F.linear(x, W) + F.linear(F.linear(x, A), B)
    draws = torch.stack([LoraLinearFn.apply(x, W, None, A, B, 1.0, 0.2) for _ in range(2000)])
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 5 * standard_error + 1e-5).all()  # E[dropout(x)] = x
    assert (draws.std(0) > 0.01).all()  # and each draw does drop something


@pytest.mark.parametrize("kind", ["nf4", "int4g"])
def test_fused_node_on_a_quantized_base_equals_the_unfused_chain_and_keeps_no_weight(kind, monkeypatch):
    """QLoRA trains through the fused node too: the weight is dequantized for the forward and again for the
    backward, so no dequantized (out, in) copy stays alive between them."""
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
    import lorakit as lk
    from lorakit.methods.lowrank.lora import Lora
    from lorakit.testing import randomize_adapters, tiny_llama

    model = lk.quantize(tiny_llama(seed=1), kind)
    lk.attach(model, lk.method_config("lora", r=4, alpha=8.0), targets="all-linear")
    randomize_adapters(model, seed=2, std=0.2)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    assert q.adapters["default"].fused_forward(x, q.base_layer) is not None
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Lora, "fused_forward", lambda self, x, base: None)
        saved: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor, saved: list[tuple[int, ...]] = saved) -> torch.Tensor:
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        results.append((loss.detach(), grads, saved))
    (loss_f, grads_f, saved_f), (loss_u, grads_u, _) = results
    torch.testing.assert_close(loss_f, loss_u, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_f, grads_u, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    weight_shapes = {(64, 64), (128, 64), (64, 128), (32, 64)}  # tiny_llama's q/k/v/o/MLP weights (out, in)
    assert not weight_shapes & set(saved_f)
