"""GoRA: ranks ∝ gradient importance under a parameter budget; B compresses the gradient step through a random A."""

import math

import peft
import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.init.gora import allocate_ranks
from lorakit.inject import wrappers
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens
from tests.init.grads import calibration, reference_gradients


def weight(make, name) -> torch.Tensor:
    layer = make().get_submodule(name)
    return layer.weight.detach().double() if isinstance(layer, torch.nn.Linear) else layer.weight.detach().double().T


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_ranks_follow_gradient_importance_under_the_budget(make):
    """r_i = clamp(round(b·I_i/ΣI/(d_in+d_out))), I = mean|W ⊙ G| from an independent gradient, b = Σ r·(d_in+d_out)."""
    r, batches = 4, calibration()
    model = lk.attach(
        make(),
        lk.method_config("lora", r=r, alpha=16.0, rslora=True, init="gora"),
        targets="all-linear",
        calibration=batches,
    )
    layers = dict(wrappers(model))
    G = reference_gradients(make, list(layers), batches)
    scores = {n: float((weight(make, n) * G[n]).abs().mean()) for n in layers}
    feats = {n: sum(w.base_layer.weight.shape) for n, w in layers.items()}
    budget, total = r * sum(feats.values()), sum(scores.values())
    for name, wrapper in layers.items():
        a = wrapper.adapters["default"]
        d_out, d_in = G[name].shape
        expected = max(r // 2, min(round(budget * scores[name] / total / feats[name]), 4 * r, d_in, d_out))
        assert a.config.r == a.A.shape[0] == a.B.shape[1] == expected, name
        assert a.scale == pytest.approx(16 / math.sqrt(expected))  # α/√r_i, the module's own rank
    ranks = [w.adapters["default"].config.r for w in layers.values()]
    assert len(set(ranks)) > 1  # the gradient really redistributes the rank
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(w.adapters["default"].config.r * feats[n] for n, w in layers.items())


def test_allocation_spends_the_budget_in_proportion():
    """Unclamped, ranks are proportional to importance and spend the budget up to rounding (≤ half a rank each)."""
    scores = {"a": 1.0, "b": 3.0, "c": 4.0, "d": 0.5}
    dims = {"a": (64, 64), "b": (64, 64), "c": (64, 128), "d": (128, 64)}
    budget = 8 * sum(i + o for i, o in dims.values())
    ranks = allocate_ranks(scores, dims, budget, (1, 64))
    spent = sum(ranks[n] * sum(dims[n]) for n in dims)
    assert abs(spent - budget) <= sum(sum(d) for d in dims.values()) / 2
    for n, score in scores.items():  # r_i is within rounding of its exact share b·I_i/ΣI/(d_in+d_out)
        assert abs(ranks[n] - budget * score / sum(scores.values()) / sum(dims[n])) <= 0.5
    assert (
        ranks["b"] > ranks["a"] and ranks["c"] * 192 > ranks["b"] * 128 > ranks["d"] * 192
    )  # parameter shares follow I
    assert allocate_ranks(scores, dims, budget, (4, 12)) == {n: max(4, min(12, k)) for n, k in ranks.items()}


def test_b_compresses_the_gradient_step_through_a():
    """s·B·A = ξ·(−ηG)·P_A (P_A = A⁺A, ξ = √(d_in/r)): the best update with A's row space, scaled to the full step."""
    eta, batches = 0.05, calibration()
    model = lk.attach(
        tiny_llama(),
        lk.method_config("lora", r=4, alpha=16.0, rslora=True, init="gora"),
        targets="all-linear",
        calibration=batches,
    )
    layers = dict(wrappers(model))
    G = reference_gradients(tiny_llama, list(layers), batches)
    for name, wrapper in layers.items():
        a = wrapper.adapters["default"]
        A, step = a.A.detach().double(), -eta * G[name]  # (r, in), (out, in)
        xi = math.sqrt(A.shape[1] / A.shape[0])
        best = torch.linalg.lstsq(A.T, step.T).solution.T @ A  # argmin_B ‖step − B·A‖ times A
        torch.testing.assert_close(best, step @ torch.linalg.pinv(A) @ A, atol=1e-9, rtol=1e-6)
        torch.testing.assert_close((a.scale * a.B @ a.A).double() / xi, best, atol=1e-7, rtol=1e-4)
    x = tokens()
    with torch.no_grad():  # the base is not shifted: the init is that approximate step, and it lowers the loss
        assert sum(float(model(**b).loss) for b in batches) < sum(float(tiny_llama()(**b).loss) for b in batches)
    assert (logits(model, x) - logits(tiny_llama(), x)).abs().max() > 1e-3


def test_saved_adapter_is_a_plain_lora_with_a_rank_pattern(tmp_path):
    """Per-module ranks are saved as PEFT's rank_pattern (use_rslora): PEFT and lorakit reload the same outputs."""
    x = tokens()
    model = lk.attach(
        tiny_gpt2(),
        lk.method_config("lora", r=4, alpha=16.0, rslora=True, init="gora"),
        targets="all-linear",
        calibration=calibration(),
    )
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "gora")
    assert lk.io.adapter.read_config(tmp_path / "gora")["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "gora").eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.load_adapter(tiny_gpt2(), tmp_path / "gora"), x), y, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    with pytest.raises(ConfigError, match="calibration"):
        lk.attach(
            tiny_llama(), lk.method_config("lora", r=4, alpha=16.0, rslora=True, init="gora"), targets="all-linear"
        )
    with pytest.raises(ConfigError, match="r_min"):
        lk.method_config("lora", r=4, alpha=16.0, rslora=True, init="gora", init_options={"r_min": 9, "r_max": 8})
    with pytest.raises(ConfigError, match="importance"):
        lk.method_config("lora", alpha=16.0, rslora=True, init="gora", init_options={"importance": "fisher"})
    x = tokens()
    masked = [{"input_ids": x, "labels": torch.full_like(x, -100)}]  # no token carries a label: no gradient
    model = tiny_llama()
    with pytest.raises(ConfigError, match="zero gradient importance"):
        lk.attach(model, lk.method_config("lora", r=4, alpha=16.0, rslora=True, init="gora"), calibration=masked)
    assert lk.adapter_names(model) == []
