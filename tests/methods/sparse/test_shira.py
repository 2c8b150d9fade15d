"""SHiRA: only the masked entries change (nnz(ΔW) = nnz(mask) = r·(d_in+d_out), ~2% of a SmolLM2 weight) yet
ΔW is high rank; scatter/restore switching gives the base back bit-exactly; PEFT's mask and outputs, both ways."""

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.sparse.shira import Shira
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import assert_same_as_peft, logits, tokens

peft = pytest.importorskip("peft")
from peft.tuners.shira.mask_functions import random_mask  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
TARGETS = ["q_proj", "v_proj", "down_proj"]
X = tokens()


def noisy(base: nn.Module, **opts) -> Shira:
    adapter = Shira.from_base(base, lk.method_config("shira", **opts))
    randomize_adapters(adapter, std=1.0)
    return adapter


@pytest.mark.parametrize("d_in, d_out, density", [(576, 576, 0.028), (576, 1536, 0.019)])
def test_only_masked_entries_change_and_update_is_high_rank(d_in, d_out, density):
    base = nn.Linear(d_in, d_out)  # SmolLM2's q_proj and gate_proj shapes
    adapter = noisy(base)
    delta = adapter.delta_weight(base)
    nnz = 8 * (d_in + d_out)
    assert torch.count_nonzero(delta) == nnz == adapter.indices.shape[1] == adapter.values.numel()
    assert nnz / (d_in * d_out) == pytest.approx(density, abs=1e-3)  # the paper's 1–2% regime
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    mask[adapter.indices[0], adapter.indices[1]] = True
    assert torch.equal(delta != 0, mask)
    assert torch.linalg.matrix_rank(delta) > 8 * 10  # LoRA with the same parameters: rank 8
    x = torch.randn(3, d_in)
    torch.testing.assert_close(adapter(x, base, base(x)), x @ (base.weight + delta).T + base.bias)


@pytest.mark.parametrize("make", [lambda: nn.Linear(40, 24), lambda: Conv1D(24, 40)])
def test_scatter_then_restore_switches_bit_exactly(make):
    base = make()
    original = base.weight.detach().clone()
    adapter = noisy(base, r=3)
    with torch.no_grad():
        merged = base.weight + adapter.delta_weight(base)
    old = adapter.scatter_(base)
    assert torch.equal(base.weight, merged)
    assert torch.count_nonzero(base.weight != original) == 3 * (40 + 24)
    adapter.restore_(base, old)
    assert torch.equal(base.weight, original)


@pytest.mark.parametrize("seed", [None, 7])
def test_mask_is_peft_random_mask(seed):
    base = nn.Linear(48, 20)
    adapter = Shira.from_base(base, lk.method_config("shira", r=2, random_seed=seed))
    mask = random_mask(base, 2, random_seed=seed)  # PEFT's mask function, (out, in) of 0/1
    assert torch.equal(adapter.indices, torch.stack(torch.where(mask == 1)))


def test_bad_shapes_and_files_are_clear_errors(tmp_path):
    with pytest.raises(lk.ConfigError, match=r"r=30 .* 2880 trainable entries, more than the layer's 32×64"):
        lk.attach(tiny_llama(), lk.method_config("shira", r=30), targets=["k_proj"])
    with pytest.raises(lk.TargetError, match="shira.*wte"):
        lk.attach(tiny_gpt2(), lk.method_config("shira"), targets=["wte"])
    lk.save_adapter(lk.attach(tiny_llama(), lk.method_config("shira", r=2), targets=["q_proj"]), tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(file)
    key = next(k for k in tensors if k.endswith("shira_indices"))
    tensors[key][1, 0] = 64  # column 64 of a 64-wide weight
    safetensors.torch.save_file(tensors, file)
    model = tiny_llama()
    with pytest.raises(lk.AdapterFormatError, match="shira_indices point outside the layer's 64×64 weight"):
        lk.load_adapter(model, tmp_path / "a")
    assert lk.adapter_names(model) == []


# --- parity with PEFT's SHiRA ---


def ours() -> nn.Module:
    model = lk.attach(tiny_llama(), lk.method_config("shira", r=4, random_seed=3), targets=TARGETS)
    randomize_adapters(model, seed=1, std=0.1)
    return model


def test_same_weights_give_same_outputs_as_peft():
    model = ours()
    state = {
        f"base_model.model.{name}.{key}": t.detach()
        for name, w in wrappers(model)
        for key, t in w.adapters["default"].export_state().items()
    }
    theirs = peft.get_peft_model(tiny_llama(), peft.ShiraConfig(r=4, random_seed=99, target_modules=TARGETS))
    assert_same_as_peft(model, theirs, state, "shira", tiny_llama(), X)  # our indices replace PEFT's (other seed) mask


def test_lorakit_dir_loads_in_peft(tmp_path):
    model = ours()
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert theirs.peft_config["default"].r == 4 and theirs.peft_config["default"].random_seed == 3
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


def test_peft_dir_loads_in_lorakit(tmp_path):
    config = peft.ShiraConfig(r=4, random_seed=5, target_modules=TARGETS, init_weights=False)
    theirs = peft.get_peft_model(tiny_llama(), config).eval()
    theirs.save_pretrained(tmp_path / "p")
    model = lk.load_adapter(tiny_llama(), tmp_path / "p")
    y = logits(theirs, X)
    assert (y - logits(tiny_llama(), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)
