"""DeLoRA: ‖ΔW‖_F ≤ λ·‖W₀‖_F whatever A and B; the update depends on A, B only through their
directions; parameters r·(d_in+d_out)+1 per layer; same outputs as PEFT's DeLoRA on the same weights."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.lowrank.delora import Delora
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import assert_same_as_peft, logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
TARGETS = ["q_proj", "v_proj", "down_proj"]
X = tokens()


def noisy(base: nn.Module, r: int = 4, lam: float = 15.0, std: float = 1.0) -> Delora:
    adapter = Delora.from_base(base, lk.method_config("delora", r=r, delora_lambda=lam))
    randomize_adapters(adapter, std=std)
    return adapter


@pytest.mark.parametrize("lam, std", [(15.0, 1.0), (2.0, 0.01), (0.5, 10.0)])
def test_update_norm_is_bounded_by_lambda_times_base_norm(lam, std):
    for seed in range(5):
        torch.manual_seed(seed)
        base = nn.Linear(48, 40)
        adapter = noisy(base, r=6, lam=lam, std=std)
        bound = adapter.lam.item() * base.weight.norm().item()
        assert adapter.delta_weight(base).norm().item() <= bound * (1 + 1e-6)


def test_rank_one_update_has_norm_lambda_times_weighted_direction():
    """r = 1: ΔW = λ·b̂·(â ⊙ w)ᵀ with w the base's column norms, so ‖ΔW‖_F = λ·‖â ⊙ w‖ exactly."""
    base = nn.Linear(20, 12)
    adapter = noisy(base, r=1, lam=3.0)
    a_hat = adapter.A[0] / adapter.A[0].norm()
    expected = adapter.lam * (a_hat * base.weight.norm(dim=0)).norm()
    torch.testing.assert_close(adapter.delta_weight(base).norm(), expected.squeeze(), rtol=1e-5, atol=0)


def test_only_directions_of_A_and_B_matter():
    """Scaling a row of A or a column of B (the 'strength' of a term) leaves ΔW unchanged: λ alone sets it."""
    base = nn.Linear(16, 24)
    adapter = noisy(base)
    before = adapter.delta_weight(base).detach().clone()
    with torch.no_grad():
        adapter.A[1] *= 7.0
        adapter.B[:, 2] *= 0.1
    torch.testing.assert_close(adapter.delta_weight(base), before, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        adapter.lam *= 2
    torch.testing.assert_close(adapter.delta_weight(base), 2 * before, atol=1e-6, rtol=1e-5)


def test_forward_matches_formula_and_conv1d_equals_linear():
    lin = nn.Linear(16, 24)
    conv = Conv1D(24, 16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    a, b = noisy(lin), Delora.from_base(conv, lk.method_config("delora", r=4))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 16)
    expected = x @ (lin.weight + a.delta_weight(lin)).T + lin.bias
    torch.testing.assert_close(a(x, lin, lin(x)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b(x, conv, conv(x)), expected, atol=1e-5, rtol=1e-5)


def test_zero_init_identity_and_param_count():
    model = tiny_llama()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("delora", r=4), targets="all-linear")
    torch.testing.assert_close(logits(model, X), y0, atol=1e-6, rtol=0)
    for _, w in wrappers(model):
        d_out, d_in = w.base_layer.weight.shape
        adapter = w.adapters["default"]
        assert sum(p.numel() for p in adapter.parameters() if p.requires_grad) == 4 * (d_in + d_out) + 1
        assert torch.count_nonzero(adapter.B) == 0 and adapter.lam.item() == 15.0


def test_embedding_and_bad_options_are_clear_errors():
    with pytest.raises(lk.TargetError, match="delora.*embed_tokens"):
        lk.attach(tiny_llama(), lk.method_config("delora"), targets=["embed_tokens"])
    with pytest.raises(lk.ConfigError, match="r must be"):
        lk.method_config("delora", r=0)
    with pytest.raises(lk.ConfigError, match="delora_lambda"):
        lk.method_config("delora", delora_lambda=-1.0)


# --- parity with PEFT's DeLoRA ---


def ours() -> nn.Module:
    model = tiny_llama()
    torch.manual_seed(0)
    lk.attach(model, lk.method_config("delora", r=4, delora_lambda=10.0), targets=TARGETS)
    randomize_adapters(model, seed=1, std=0.3)
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"base_model.model.{name}.{key}": t.detach()
        for name, w in wrappers(model)
        for key, t in w.adapters["default"].export_state().items()
    }


def test_same_weights_give_same_outputs_as_peft():
    model = ours()
    theirs = peft.get_peft_model(tiny_llama(), peft.DeloraConfig(r=4, delora_lambda=10, target_modules=TARGETS))
    assert_same_as_peft(model, theirs, state_of(model), "delora", tiny_llama(), X)


def test_lorakit_dir_loads_in_peft(tmp_path):
    model = ours()
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert theirs.peft_config["default"].r == 4 and theirs.peft_config["default"].delora_lambda == 10
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


def test_peft_dir_loads_in_lorakit(tmp_path):
    cfg = peft.DeloraConfig(r=4, target_modules=TARGETS, init_weights=False, rank_pattern={"down_proj": 2})
    theirs = peft.get_peft_model(tiny_llama(), cfg).eval()
    theirs.save_pretrained(tmp_path / "p")
    model = lk.load_adapter(tiny_llama(), tmp_path / "p")
    ranks = {n.rsplit(".", 1)[-1]: w.adapters["default"].config.r for n, w in wrappers(model)}
    assert ranks == {"q_proj": 4, "v_proj": 4, "down_proj": 2}
    y = logits(theirs, X)
    assert (y - logits(tiny_llama(), X)).abs().max() > 1e-3  # PEFT's non-zero init really changes the output
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
