"""GraLoRA: ΔW is a k×k grid of rank-(r/k) blocks B_j^(n)·A_n^(j) (rank up to k·r) with LoRA's parameter
count at rank r; merged = unmerged; same outputs as PEFT's GraLoRA on the same weights, both ways."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.methods.structured.gralora import Gralora
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import assert_same_as_peft, logits, tokens

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}
X = tokens()


def noisy(base: nn.Module, **opts) -> Gralora:
    adapter = Gralora.from_base(base, lk.method_config("gralora", **opts))
    randomize_adapters(adapter, std=0.3)
    return adapter


def reference_delta(adapter: Gralora, d_in: int, d_out: int) -> torch.Tensor:
    """The paper's grid, block by block: block (j, n) = B_j[:, group n] @ A_n[group j, :]."""
    k, s = adapter.config.gralora_k, adapter.config.r // adapter.config.gralora_k
    delta = torch.zeros(d_out, d_in)
    for j in range(k):
        for n in range(k):
            A_n = adapter.A[n].T  # (r, in/k)
            B_j = adapter.B[j].T  # (out/k, r)
            rows, cols = slice(j * d_out // k, (j + 1) * d_out // k), slice(n * d_in // k, (n + 1) * d_in // k)
            delta[rows, cols] = B_j[:, n * s : (n + 1) * s] @ A_n[j * s : (j + 1) * s]
    return adapter.scale * delta


@pytest.mark.parametrize("k, r", [(1, 4), (2, 4), (4, 8), (3, 6)])
def test_delta_is_a_grid_of_low_rank_blocks_with_rank_k_times_r(k, r):
    base = nn.Linear(48, 36)
    adapter = noisy(base, r=r, alpha=2.0 * r, gralora_k=k)
    delta = adapter.delta_weight(base)
    torch.testing.assert_close(delta, reference_delta(adapter, 48, 36), atol=1e-6, rtol=1e-5)
    for j in range(k):
        for n in range(k):
            block = delta[j * 36 // k : (j + 1) * 36 // k, n * 48 // k : (n + 1) * 48 // k]
            assert torch.linalg.matrix_rank(block) == r // k
    assert torch.linalg.matrix_rank(delta) == k * r  # LoRA at rank r: r


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_unmerged_forward_equals_merged_weight(hybrid_r):
    base = nn.Linear(32, 24)
    adapter = noisy(base, r=4, gralora_k=2, hybrid_r=hybrid_r)
    x = torch.randn(2, 5, 32)
    expected = x @ (base.weight + adapter.delta_weight(base)).T + base.bias
    torch.testing.assert_close(adapter(x, base, base(x)), expected, atol=1e-5, rtol=1e-5)
    if hybrid_r:  # the hybrid part is a plain LoRA on the whole matrix
        plain = adapter.scale * adapter.B_h @ adapter.A_h
        torch.testing.assert_close(adapter.delta_weight(base) - reference_delta(adapter, 32, 24), plain)


def test_param_count_equals_lora_at_rank_r_and_init_is_identity():
    counts = {}
    for method, opts in (("gralora", {"gralora_k": 4}), ("lora", {})):
        model = tiny_llama()
        y0 = logits(model, X)
        lk.attach(model, lk.method_config(method, r=8, **opts), targets="all-linear")
        torch.testing.assert_close(logits(model, X), y0, atol=1e-6, rtol=0)
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per layer: q 64→64, k/v 64→32, o 64→64, gate/up 64→128, down 128→64; two layers
    assert counts["gralora"] == counts["lora"] == 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)


def test_bad_shapes_and_options_are_clear_errors():
    with pytest.raises(lk.ConfigError, match=r"gralora_k=3 must divide the layer's in_features \(64\)"):
        lk.attach(tiny_llama(), lk.method_config("gralora", r=6, gralora_k=3), targets=["q_proj"])
    with pytest.raises(lk.ConfigError, match="gralora_k=4 must divide r=6"):
        lk.method_config("gralora", r=6, gralora_k=4)
    with pytest.raises(lk.TargetError, match="gralora.*wte"):
        lk.attach(tiny_gpt2(), lk.method_config("gralora"), targets=["wte"])


# --- parity with PEFT's GraLoRA (Linear on Llama, Conv1D on GPT-2) ---


def ours(kind: str, hybrid_r: int) -> nn.Module:
    make, targets = MODELS[kind]
    model = make()
    lk.attach(model, lk.method_config("gralora", r=4, alpha=6.0, hybrid_r=hybrid_r), targets=targets)
    randomize_adapters(model, seed=1, std=0.1)
    return model


def peft_config(kind: str, hybrid_r: int, **kw):
    return peft.GraloraConfig(r=4, alpha=6, hybrid_r=hybrid_r, target_modules=MODELS[kind][1], **kw)


def export(wrapper) -> dict[str, torch.Tensor]:
    return {key: t.detach() for key, t in wrapper.adapters["default"].export_state().items()}


CASES = [pytest.param(kind, h, id=f"{kind}-hybrid{h}") for kind in MODELS for h in (0, 2)]


@pytest.mark.parametrize("kind, hybrid_r", CASES)
def test_same_weights_give_same_outputs_as_peft(kind, hybrid_r):
    model = ours(kind, hybrid_r)
    state = {f"base_model.model.{n}.{key}": t for n, w in wrappers(model) for key, t in export(w).items()}
    theirs = peft.get_peft_model(MODELS[kind][0](), peft_config(kind, hybrid_r))
    assert_same_as_peft(model, theirs, state, "gralora", MODELS[kind][0](), X)


@pytest.mark.parametrize("kind, hybrid_r", CASES)
def test_lorakit_dir_loads_in_peft(kind, hybrid_r, tmp_path):
    model = ours(kind, hybrid_r)
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(MODELS[kind][0](), tmp_path / "a").eval()
    assert theirs.peft_config["default"].hybrid_r == hybrid_r
    torch.testing.assert_close(logits(theirs, X), logits(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, hybrid_r", CASES)
def test_peft_dir_loads_in_lorakit(kind, hybrid_r, tmp_path):
    theirs = peft.get_peft_model(MODELS[kind][0](), peft_config(kind, hybrid_r, init_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "p")
    model = lk.load_adapter(MODELS[kind][0](), tmp_path / "p")
    y = logits(theirs, X)
    assert (y - logits(MODELS[kind][0](), X)).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, X), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.merge(model), X), y, atol=1e-5, rtol=1e-5)
