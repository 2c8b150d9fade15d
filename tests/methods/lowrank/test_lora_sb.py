"""LoRA-SB: frozen B, A and a trained r×r core R; s·B·R·A at init is the best rank-r approximation of ΔW₁ = −η·G."""

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.methods.lowrank.lora_sb import LoraSB
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens
from tests.init.grads import calibration, reference_gradients


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("first_step", ["sgd", "adam"])
def test_init_is_the_eckart_young_optimum_of_the_first_step(make, first_step):
    """‖ΔW₁ − s·B·R·A‖_F = √(Σ_{i>r} σ_i(ΔW₁)²) (1e-5), with ΔW₁ = −η·G or −η·sign(G); B, A orthonormal."""
    r, lr, batches = 4, 1.0, calibration()
    cfg = lk.method_config("lora_sb", r=r, lr=lr, first_step=first_step)
    model = lk.attach(make(), cfg, targets="all-linear", calibration=batches)
    layers = dict(wrappers(model))
    G = reference_gradients(make, list(layers), batches)
    for name, wrapper in layers.items():
        a = wrapper.adapters["default"]
        step = -lr * (torch.sign(G[name]) if first_step == "adam" else G[name])  # float64
        sigma = torch.linalg.svdvals(step)
        err = (step - (a.scale * a.B @ a.R @ a.A).double()).norm()
        torch.testing.assert_close(err, sigma[r:].square().sum().sqrt(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.B.T @ a.B, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.A @ a.A.T, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.R.detach().diagonal().double(), sigma[:r], atol=1e-5, rtol=1e-5)


def test_only_the_core_trains_and_the_frozen_factors_stay():
    """r² trainable parameters per layer; a training step moves R only."""
    r = 4
    model = lk.attach(tiny_llama(), lk.method_config("lora_sb", r=r), targets="all-linear", calibration=calibration())
    layers = list(wrappers(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == len(layers) * r * r == 14 * 16
    before = {n: {k: t.detach().clone() for k, t in w.adapters["default"].export_state().items()} for n, w in layers}
    x = tokens()
    model(x, labels=x).loss.backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    for n, w in layers:
        now = w.adapters["default"].export_state()
        assert torch.equal(now["lora_sb_A"], before[n]["lora_sb_A"]) and torch.equal(
            now["lora_sb_B"], before[n]["lora_sb_B"]
        )
        assert not torch.equal(now["lora_sb_R"].detach(), before[n]["lora_sb_R"])


def test_to_lora_is_exact_and_merge_equals_forward():
    x = tokens()
    model = lk.attach(
        tiny_gpt2(), lk.method_config("lora_sb", r=4, lr=1.0), targets="all-linear", calibration=calibration()
    )
    y = logits(model, x)
    assert (y - logits(tiny_gpt2(), x)).abs().max() > 1e-3  # the init is a (rank-r) step, not the base
    for _, w in wrappers(model):
        a = w.adapters["default"]
        f = a.to_lora(w.base_layer)
        torch.testing.assert_close(f.scale * f.B @ f.A, a.scale * a.B @ a.R @ a.A, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip_keeps_the_frozen_factors(tmp_path):
    """B and A come from data, so they travel with R in the adapter file; reloading gives the same outputs."""
    x = tokens()
    model = lk.attach(
        tiny_llama(), lk.method_config("lora_sb", r=4, lr=1.0), targets="all-linear", calibration=calibration()
    )
    lk.save_adapter(model, tmp_path / "sb")
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "sb")
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=1e-6)


def test_clear_errors():
    with pytest.raises(ConfigError, match="calibration"):
        lk.attach(tiny_llama(), lk.method_config("lora_sb", r=4), targets="all-linear")
    with pytest.raises(ConfigError, match="first_step"):
        lk.method_config("lora_sb", first_step="lion")
    with pytest.raises(ConfigError, match="exceeds the rank"):
        LoraSB.from_base(torch.nn.Linear(16, 6), lk.method_config("lora_sb", r=8))
    x = tokens(1, 3)
    with pytest.raises(ConfigError, match="at least 4"):
        lk.attach(tiny_llama(), lk.method_config("lora_sb", r=4), calibration=[{"input_ids": x, "labels": x}])
    with pytest.raises(ConfigError, match="'labels'"):
        lk.attach(tiny_llama(), lk.method_config("lora_sb", r=4), calibration=[{"input_ids": tokens()}])
