"""EDoRA: W' = m ⊙ (W₀ + s·U·R·ΣVᵀ)/‖·‖_row with U, ΣVᵀ frozen from W₀'s SVD; only R (r×r) and m train
(r² + d_out per layer); R = 0 is the base; merged = unmerged; equals PEFT's DoRA run with B·R·A (the authors' code)."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.methods.lowrank.edora import Edora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
X = tokens()


def _bases() -> list[nn.Module]:
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # (out=24, in=16)
    nn.init.normal_(conv.weight)
    return [nn.Linear(16, 24), conv, nn.Embedding(50, 24)]


def reference_weight(adapter: Edora, base: nn.Module) -> torch.Tensor:
    """The paper's W' = m ⊙ V/‖V‖_row with V = W₀ + (α/r)·U·R·ΣVᵀ, in (out, in) orientation."""
    W = L.weight_out_in(base).detach()
    V = W + adapter.config.alpha / adapter.config.r * adapter.U @ adapter.R.detach() @ adapter.SV
    return adapter.m.detach()[:, None] * V / V.norm(dim=1, keepdim=True)


def test_frozen_factors_are_the_truncated_svd_and_magnitude_starts_at_the_row_norms():
    for base in _bases():
        adapter = Edora.from_base(base, lk.method_config("edora", r=4))
        W = L.weight_out_in(base).detach()
        s = torch.linalg.svdvals(W)
        torch.testing.assert_close(adapter.U.T @ adapter.U, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close((W - adapter.U @ adapter.SV).norm(), s[4:].square().sum().sqrt())
        torch.testing.assert_close(adapter.m.detach(), W.norm(dim=1))


@pytest.mark.parametrize("index", [0, 1, 2], ids=["linear", "conv1d", "embedding"])
def test_output_is_the_magnitude_times_the_normalised_direction_and_merge_is_exact(index):
    base = _bases()[index]
    adapter = Edora.from_base(base, lk.method_config("edora", r=4, alpha=8.0)).eval()
    randomize_adapters(adapter, std=0.3)
    W1 = reference_weight(adapter, base)  # (out, in)
    if isinstance(base, nn.Embedding):
        x = torch.randint(0, 50, (2, 5))
        expected = W1.T[x]
    else:
        x = torch.randn(2, 5, 16)
        expected = x @ W1.T + base.bias
    torch.testing.assert_close(adapter(x, base, base(x)), expected, atol=1e-5, rtol=1e-5)
    merged = L.weight_out_in(base).detach() + L.to_base_layout(base, adapter.delta_weight(base)).detach()
    torch.testing.assert_close(merged, W1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(W1.norm(dim=1), adapter.m.detach().abs())  # |m| is exactly the row norm


def test_only_r_squared_plus_d_out_parameters_train_and_the_factors_stay_frozen():
    model = tiny_llama()
    lk.attach(model, lk.method_config("edora", r=4), targets="all-linear")
    layers = list(wrappers(model))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(4 * 4 + L.dims(w.base_layer)[1] for _, w in layers)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"R", "m"}
    frozen = {n: (w.adapters["default"].U.clone(), w.adapters["default"].SV.clone()) for n, w in layers}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(X, labels=X).loss.backward()
    opt.step()
    for n, w in layers:
        a = w.adapters["default"]
        assert torch.equal(a.U, frozen[n][0]) and torch.equal(a.SV, frozen[n][1])
        assert a.R.grad.abs().sum() > 0 and a.m.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_r_zero_is_the_base_and_the_default_init_is_within_noise_of_it(make, tmp_path):
    model = make()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("edora", r=4, init_std=0.0), targets="all-linear")
    torch.testing.assert_close(logits(model, X), y0, atol=1e-5, rtol=1e-5)
    noisy = make()
    lk.attach(noisy, lk.method_config("edora"), targets="all-linear")
    assert 0 < (logits(noisy, X) - y0).abs().max() < 1e-3
    randomize_adapters(model, std=0.2)
    y = logits(model, X)
    assert (y - y0).abs().max() > 1e-2
    lk.save_adapter(model, tmp_path / "a")  # only R and m are stored; U, ΣVᵀ come back from the base's SVD
    torch.testing.assert_close(logits(lk.load_adapter(make(), tmp_path / "a"), X), y, atol=1e-5, rtol=1e-5)


def test_equals_peft_dora_with_the_authors_b_r_a_factors():
    """The authors run PEFT's DoRA with lora_B = U_r, lora_A = Σ_r V_rᵀ and R between them (forward_edora)."""
    targets = ["q_proj", "v_proj", "down_proj"]
    model = tiny_llama()
    lk.attach(model, lk.method_config("edora", r=4, alpha=16.0), targets=targets)
    randomize_adapters(model, seed=1, std=0.3)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, use_dora=True, target_modules=targets)
    )
    with torch.no_grad():
        for name, wrapper in wrappers(model):
            a, layer = wrapper.adapters["default"], theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(a.R @ a.SV)  # B·(R·A): R folded into lora_A
            layer.lora_B["default"].weight.copy_(a.U)
            layer.lora_magnitude_vector["default"].weight.copy_(a.m)
    y = logits(model, X)
    assert (y - logits(tiny_llama(), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs.eval(), X), y, atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match=r"edora r=40 exceeds .* d_in=64, d_out=32 .* \(32\)"):
        lk.attach(tiny_llama(), lk.method_config("edora", r=40), targets=["k_proj"])
    with pytest.raises(lk.ConfigError, match="init_std must be >= 0"):
        lk.method_config("edora", init_std=-1.0)
    with pytest.raises(lk.ConfigError, match="r must be a positive integer"):
        lk.method_config("edora", r=0)
