"""C3A: the FFT circular-convolution forward equals the dense block-circulant matmul (values and gradients);
ΔW can be full rank with d_in·d_out/b parameters; same outputs as PEFT's C3A on the same weights, both ways."""

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.structured.c3a import C3A
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import assert_same_as_peft, logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
TARGETS = ["q_proj", "v_proj", "down_proj"]
X = tokens()


def dense_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The paper's ΔW entry by entry: block (i, j) is the circulant with first row w_ij, divided by d_in."""
    m, n, b = kernel.shape
    delta = torch.zeros(m * b, n * b, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            for t in range(b):
                delta[i * b + t, j * b : (j + 1) * b] = torch.roll(kernel[i, j].double(), t)  # row t: w shifted by t
    return delta / (n * b)


@pytest.mark.parametrize("d_in, d_out, b", [(12, 8, 4), (16, 16, 16), (30, 45, 5), (6, 6, 1)])
def test_fft_forward_equals_dense_circulant_matmul(d_in, d_out, b):
    base = nn.Linear(d_in, d_out)
    adapter = C3A.from_base(base, lk.method_config("c3a", block_size=b, init="gaussian"))
    dense = dense_circulant(adapter.kernel.detach()).float()  # (out, in)
    torch.testing.assert_close(adapter.delta_weight(base), dense, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, d_in)
    torch.testing.assert_close(adapter(x, base, base(x)), base(x) + x @ dense.T, atol=1e-5, rtol=1e-5)


def test_gradients_through_the_fft_equal_those_of_the_dense_form():
    base = nn.Linear(24, 16)
    adapter = C3A.from_base(base, lk.method_config("c3a", block_size=8))
    x, g = torch.randn(5, 24, requires_grad=True), torch.randn(5, 16)
    (adapter(x, base, base(x)) * g).sum().backward()
    fft_grads = adapter.kernel.grad.clone(), x.grad.clone()
    adapter.kernel.grad, x.grad = None, None
    ((x @ (base.weight + adapter.delta_weight(base)).T + base.bias) * g).sum().backward()
    torch.testing.assert_close(fft_grads[0], adapter.kernel.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fft_grads[1], x.grad, atol=1e-5, rtol=1e-5)


def test_full_rank_update_from_few_parameters():
    base = nn.Linear(64, 64)
    adapter = C3A.from_base(base, lk.method_config("c3a", block_size=16))
    assert adapter.kernel.numel() == 64 * 64 // 16 == 2 * (64 + 64)  # LoRA's budget at r = 2 ...
    assert torch.linalg.matrix_rank(adapter.delta_weight(base)) == 64  # ... but rank 64, not 2


def test_inits_and_param_count_on_a_model():
    bound = math.sqrt(6 / (64 + 128))  # xavier_uniform over the whole gate_proj (64 -> 128)
    model = lk.attach(tiny_llama(), lk.method_config("c3a"), targets="all-linear")
    for name, w in wrappers(model):
        d_out, d_in = w.base_layer.weight.shape
        kernel = w.adapters["default"].kernel
        assert kernel.shape == (d_out // 32, d_in // 32, 32) and kernel.requires_grad
        if name.endswith("gate_proj"):
            assert 0.8 * bound < kernel.abs().max() <= bound
    model = tiny_llama()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("c3a", init="zeros"), targets="all-linear")
    assert torch.equal(logits(model, X), y0)


def test_bad_shapes_and_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match=r"block_size=48 must divide .* in_features \(64\).*gcd is 32"):
        lk.attach(tiny_llama(), lk.method_config("c3a", block_size=48), targets=["k_proj"])
    with pytest.raises(lk.ConfigError, match="init must be one of"):
        lk.method_config("c3a", init="ones")
    with pytest.raises(lk.TargetError, match="c3a.*wte"):
        lk.attach(tiny_gpt2(), lk.method_config("c3a"), targets=["wte"])


# --- parity with PEFT's C3A ---


def ours() -> nn.Module:
    model = lk.attach(tiny_llama(), lk.method_config("c3a", block_size=16), targets=TARGETS)
    randomize_adapters(model, seed=1, std=1.0)
    return model


def test_same_weights_give_same_outputs_as_peft():
    model = ours()
    state = {f"base_model.model.{n}.c3a_kernel": w.adapters["default"].kernel.detach() for n, w in wrappers(model)}
    theirs = peft.get_peft_model(tiny_llama(), peft.C3AConfig(block_size=16, target_modules=TARGETS))
    assert_same_as_peft(model, theirs, state, "c3a", tiny_llama(), X)


def test_lorakit_dir_loads_in_peft(tmp_path):
    model = ours()
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert theirs.peft_config["default"].block_size == 16
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["xavier_uniform", "kaiming_uniform"])
def test_peft_dir_loads_in_lorakit(init, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.C3AConfig(block_size=16, target_modules=TARGETS, init_weights=init))
    theirs.eval().save_pretrained(tmp_path / "p")
    model = lk.load_adapter(tiny_llama(), tmp_path / "p")
    assert {w.adapters["default"].config.init for _, w in wrappers(model)} == {init}
    y = logits(theirs, X)
    assert (y - logits(tiny_llama(), X)).abs().max() > 1e-3  # PEFT's default init is not the identity
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)
