"""Bone: every r×r block becomes W₀_ij·(I + B_i) + B_i with one trainable (out/r, r, r) tensor per layer;
merged = unmerged; same outputs as PEFT's MiSS init_weights="bat" on the same weights, both ways."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.structured.bone import Bone
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import assert_same_as_peft, logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
TARGETS = ["q_proj", "v_proj", "down_proj"]
X = tokens()


def noisy(base: nn.Module, r: int) -> Bone:
    adapter = Bone.from_base(base, lk.method_config("bone", r=r))
    randomize_adapters(adapter, std=0.3)
    return adapter


@pytest.mark.parametrize("d_in, d_out, r", [(12, 8, 4), (16, 32, 16), (6, 9, 3)])
def test_each_block_is_affinely_transformed_by_its_row_matrix(d_in, d_out, r):
    base = nn.Linear(d_in, d_out)
    adapter = noisy(base, r)
    merged = base.weight + adapter.delta_weight(base)
    W, B, eye = base.weight, adapter.B, torch.eye(r)
    for i in range(d_out // r):
        for j in range(d_in // r):
            rows, cols = slice(i * r, (i + 1) * r), slice(j * r, (j + 1) * r)
            torch.testing.assert_close(merged[rows, cols], W[rows, cols] @ (eye + B[i]) + B[i], atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, d_in)
    torch.testing.assert_close(adapter(x, base, base(x)), x @ merged.T + base.bias, atol=1e-5, rtol=1e-5)


def test_one_trainable_matrix_per_layer_and_identity_at_init():
    model = tiny_llama()
    y0 = logits(model, X)
    lk.attach(model, lk.method_config("bone"), targets="all-linear")
    torch.testing.assert_close(logits(model, X), y0, atol=1e-6, rtol=0)
    for _, w in wrappers(model):
        adapter, d_out = w.adapters["default"], w.base_layer.weight.shape[0]
        trainable = [p for p in adapter.parameters() if p.requires_grad]
        assert len(trainable) == 1 and trainable[0].shape == (d_out // 32, 32, 32)  # d_out·r parameters


def test_update_is_guided_by_the_base_weight_and_conv1d_equals_linear():
    lin, conv = nn.Linear(16, 8), Conv1D(8, 16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
    a = noisy(lin, 4)
    b = Bone.from_base(conv, lk.method_config("bone", r=4))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.delta_weight(conv), a.delta_weight(lin).T)
    other = nn.Linear(16, 8)  # same B, another base: another update
    assert (a.delta_weight(other) - a.delta_weight(lin)).abs().max() > 1e-3


def test_bad_shapes_and_unsupported_files_are_clear_errors(tmp_path):
    with pytest.raises(lk.ConfigError, match=r"r=48 \(the block size\) must divide .* in_features \(64\)"):
        lk.attach(tiny_llama(), lk.method_config("bone", r=48), targets=["q_proj"])
    with pytest.raises(lk.TargetError, match="bone.*wte"):
        lk.attach(tiny_gpt2(), lk.method_config("bone"), targets=["wte"])
    peft.get_peft_model(tiny_llama(), peft.MissConfig(r=16, target_modules=TARGETS)).save_pretrained(tmp_path / "m")
    with pytest.raises(lk.AdapterFormatError, match="peft_type='MISS' is not a method lorakit can load"):
        lk.load_adapter(tiny_llama(), tmp_path / "m")  # MiSS's default mode is not Bone


# --- parity with PEFT's MiSS in "bat" (Bone) mode ---


def ours() -> nn.Module:
    model = lk.attach(tiny_llama(), lk.method_config("bone", r=16), targets=TARGETS)
    randomize_adapters(model, seed=1, std=0.1)
    return model


def test_same_weights_give_same_outputs_as_peft():
    model = ours()
    state = {f"base_model.model.{n}.miss_block": w.adapters["default"].B.detach() for n, w in wrappers(model)}
    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(r=16, init_weights="bat", target_modules=TARGETS))
    assert_same_as_peft(model, theirs, state, "miss", tiny_llama(), X)


def test_lorakit_dir_loads_in_peft(tmp_path):
    model = ours()
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert theirs.peft_config["default"].init_weights == "bat" and theirs.peft_config["default"].r == 16
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


def test_peft_dir_loads_in_lorakit(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(r=16, init_weights="bat", target_modules=TARGETS))
    randomize_adapters(theirs, seed=2, std=0.1)  # PEFT's "bat" init is zero: give it an effect
    theirs.eval().save_pretrained(tmp_path / "p")
    model = lk.load_adapter(tiny_llama(), tmp_path / "p")
    y = logits(theirs, X)
    assert (y - logits(tiny_llama(), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)
