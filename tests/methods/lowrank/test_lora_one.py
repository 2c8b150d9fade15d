"""LoRA-One: B, A are the top-r SVD of −G (one full gradient) scaled by 1/√(γσ₁); the init is that gradient step."""

import peft
import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens
from tests.init.grads import calibration, reference_gradients


def principal_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of X and Y (radians)."""
    qx, qy = torch.linalg.qr(X.double())[0], torch.linalg.qr(Y.double())[0]
    return float(torch.acos(torch.linalg.svdvals(qx.T @ qy).clamp(max=1.0)).max())


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_factors_are_the_scaled_top_r_svd_of_the_negative_gradient(make):
    """s·B·A = (s/(γσ₁))·[−G]_r, and col(B), row(A) are G's top-r singular subspaces (angle < 1e-4)."""
    r, batches = 4, calibration()
    model = lk.attach(make(), lk.method_config("lora_one", r=r), targets="all-linear", calibration=batches)
    layers = dict(wrappers(model))
    assert len(layers) == (14 if make is tiny_llama else 8)
    G = reference_gradients(make, list(layers), batches)
    for name, wrapper in layers.items():
        a = wrapper.adapters["default"]
        U, S, Vh = torch.linalg.svd(-G[name])  # float64
        step = (U[:, :r] * S[:r]) @ Vh[:r] * (a.scale / (dict(a.config.init_options).get("gamma", 128.0) * S[0]))
        torch.testing.assert_close((a.scale * a.B @ a.A).double(), step, atol=1e-7, rtol=1e-5)
        assert principal_angle(a.B.detach(), U[:, :r]) < 1e-4
        assert principal_angle(a.A.detach().T, Vh[:r].T) < 1e-4
        assert a.scale == pytest.approx(16 / r**0.5)  # the authors' rsLoRA α = 16


def test_init_is_one_gradient_step_that_lowers_the_loss():
    """The base is not shifted: merged W = W₀ − η·[G]_r, and that first step lowers the calibration loss."""
    batches = calibration()
    base = tiny_llama()
    model = lk.attach(tiny_llama(), lk.method_config("lora_one", r=4), targets="all-linear", calibration=batches)
    for name, wrapper in wrappers(model):
        torch.testing.assert_close(wrapper.base_layer.weight, base.get_submodule(name).weight, atol=0, rtol=0)
    with torch.no_grad():
        before = sum(float(base(**b).loss) for b in batches)
        after = sum(float(model(**b).loss) for b in batches)
    assert after < before


def test_preconditioned_gradients_are_the_papers_preconditioners():
    """∇_A ← (BᵀB+λI)⁻¹∇_A and ∇_B ← ∇_B(AAᵀ+λI)⁻¹ on the very same weights and input."""
    batches, x = calibration(), tokens(2, 8, seed=5)
    grads = {}
    for pre in (False, True):
        torch.manual_seed(0)
        cfg = lk.method_config("lora_one", r=4, preconditioned=pre, precond_reg=1e-3)
        model = lk.attach(tiny_llama(), cfg, targets=["q_proj"], calibration=batches)
        model(x, labels=x).loss.backward()
        adapters = [w.adapters["default"] for _, w in wrappers(model)]
        grads[pre] = [(a.A.detach(), a.B.detach(), a.A.grad, a.B.grad) for a in adapters]
    for (A, B, gA, gB), (A2, B2, pA, pB) in zip(grads[False], grads[True], strict=True):
        assert torch.equal(A, A2) and torch.equal(B, B2)
        eye = 1e-3 * torch.eye(4)
        torch.testing.assert_close(pA, torch.linalg.solve(B.T @ B + eye, gA), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(pB, gB @ torch.linalg.inv(A @ A.T + eye), atol=1e-6, rtol=1e-4)


def test_saved_adapter_is_a_plain_lora_that_peft_and_lorakit_load(tmp_path):
    """The base is unchanged, so the save is a plain PEFT LoRA (use_rslora): same outputs in PEFT and on reload."""
    x = tokens()
    model = lk.attach(tiny_llama(), lk.method_config("lora_one", r=4), targets="all-linear", calibration=calibration())
    y = logits(model, x)
    assert (y - logits(tiny_llama(), x)).abs().max() > 1e-3
    lk.save_adapter(model, tmp_path / "one")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "one").eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
    ours = lk.load_adapter(tiny_llama(), tmp_path / "one")
    torch.testing.assert_close(logits(ours, x), y, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    with pytest.raises(ConfigError, match="calibration"):
        lk.attach(tiny_llama(), lk.method_config("lora_one", r=4), targets="all-linear")
    x = tokens(1, 4)
    with pytest.raises(ConfigError, match="at least 8"):  # a rank-8 step needs at least 8 token rows
        lk.attach(tiny_llama(), lk.method_config("lora_one", r=8), calibration=[{"input_ids": x, "labels": x}])
    with pytest.raises(ConfigError, match="labels"):
        lk.attach(tiny_llama(), lk.method_config("lora_one", r=2), calibration=[{"input_ids": tokens()}])
    with pytest.raises(ConfigError, match="exceeds the rank"):
        lk.attach(tiny_llama(), lk.method_config("lora_one", r=65), calibration=calibration())
    with pytest.raises(ConfigError, match="gamma"):
        lk.method_config("lora_one", init_options={"gamma": 0})
    model = tiny_llama()
    with pytest.raises(ConfigError, match="calibration batch 0"):
        lk.attach(model, lk.method_config("lora_one", r=2), calibration=[[1, 2, 3]])
    assert lk.adapter_names(model) == []  # a failed init leaves no adapter behind
