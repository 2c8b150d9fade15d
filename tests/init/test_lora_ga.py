"""LoRA-GA: A, B from the SVD of the sampled full gradient G; outputs unchanged at init; the first SGD step of
the adapter is the best rank-2r approximation of the full step −η·G (Theorem 3.1); PEFT lora_ga parity."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.init._calib import full_gradients
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens

peft = pytest.importorskip("peft")
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(seed: int = 5, b: int = 2, t: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = tokens(b, t, seed=seed)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def best_rank(G: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_outputs_unchanged_and_factors_are_the_gradients_singular_vectors(make):
    original, model, data = make(), make(), batches()
    x = tokens()
    names = [n for n, m in original.named_modules() if n.endswith(("q_proj", "down_proj", "c_attn", "c_fc"))]
    G = full_gradients(original, names, data)
    lk.attach(model, lk.method_config("lora", r=4, alpha=8, init="lora_ga"), targets=names, calibration=data)
    torch.testing.assert_close(logits(model, x), logits(original, x), atol=1e-5, rtol=0)
    originals = dict(original.named_modules())
    for name, wrapper in wrappers(model):
        a = wrapper.adapters["default"]
        U, S, Vh = torch.linalg.svd(G[name].double(), full_matrices=False)
        c2 = G[name].shape[0] ** 0.5 / 16  # stable scaling: c = d_out^{1/4}/√γ on each factor
        # A's rows span V[:, :r] and B's columns U[:, r:2r], each scaled by c
        torch.testing.assert_close(
            a.A.double() @ a.A.double().T, c2 * torch.eye(4, dtype=torch.double), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(a.A.double().T @ a.A.double(), c2 * Vh[:4].T @ Vh[:4], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.B.double() @ a.B.double().T, c2 * U[:, 4:8] @ U[:, 4:8].T, atol=1e-5, rtol=0)
        residual = L.weight_out_in(wrapper.base_layer).double()
        W = L.weight_out_in(originals[name]).double()
        torch.testing.assert_close(residual, W - a.scale * a.B.double() @ a.A.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init_scale", ["stable", "gd"])
def test_first_sgd_step_is_the_best_rank_2r_approximation_of_the_full_step(init_scale):
    """One SGD step on (A, B) moves W_eff by −η·s²·(B₀B₀ᵀG + G·A₀ᵀA₀) = −η·s²c²·[G]₂ᵣ (first order in η)."""
    data, eta, r = batches(), 1e-4, 4
    names = [n for n, _ in tiny_llama().named_modules() if n.endswith(tuple(LLAMA))]
    G = full_gradients(tiny_llama(), names, data)
    gains = {}
    for method in ("lora_ga", "lora"):
        model = tiny_llama()
        opts = {"init": "lora_ga", "init_options": {"init_scale": init_scale}} if method == "lora_ga" else {}
        lk.attach(model, lk.method_config("lora", r=r, alpha=8, **opts), targets=LLAMA, calibration=data)
        model(**data[0]).loss.backward()
        for name, w in wrappers(model):
            a = w.adapters["default"]
            A, B, gA, gB = (t.detach().double() for t in (a.A, a.B, a.A.grad, a.B.grad))
            step = a.scale * ((B - eta * gB) @ (A - eta * gA) - B @ A)  # SGD's step on W_eff, in float64
            g = G[name].double()
            gains[method, name] = float(-(step * g).sum() / (step.norm() * g.norm()))  # cosine with −G
            if method == "lora_ga":
                c2 = g.shape[0] ** 0.5 / 16 if init_scale == "stable" else 1 / 2**2  # s = alpha/r = 2
                expected = -eta * 2**2 * c2 * best_rank(g, 2 * r)
                torch.testing.assert_close(step, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-3)
                # so its direction captures exactly the share of G that a rank-2r matrix can: ‖[G]₂ᵣ‖/‖G‖
                assert gains[method, name] == pytest.approx(float(best_rank(g, 2 * r).norm() / g.norm()), rel=1e-3)
    for name in names:  # default LoRA's first step (B = 0: only B moves, along G·A₀ᵀ) is less aligned
        assert gains["lora_ga", name] > gains["lora", name]


def peft_lora_ga(data, **sub) -> torch.nn.Module:
    from peft.tuners.lora import preprocess_loraga

    model = tiny_llama()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(**sub)
    )
    preprocess_loraga(model, config, lambda: [model(**b).loss.backward() for b in data])
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize(
    "ours, theirs",
    [({}, {}), ({"init_scale": "gd", "direction": "A2rBr"}, {"scale": "gd_scale", "direction": "A2rBr"})],
)
def test_matches_peft_lora_ga_on_the_same_gradient(ours, theirs, tmp_path):
    """16 tokens: G has rank ≤ 16 = PEFT's sketch size 4r, so its svd_lowrank is exact and factors agree up to sign."""
    data, x = batches(), tokens()
    mine = tiny_llama()
    lk.attach(
        mine,
        lk.method_config("lora", r=4, alpha=8, init="lora_ga", init_options={"peft_variant": True, **ours}),
        targets=LLAMA,
        calibration=data,
    )
    model = peft_lora_ga(data, **theirs)
    y0 = logits(tiny_llama(), x)
    torch.testing.assert_close(logits(model, x), y0, atol=1e-5, rtol=0)  # theirs is an identity too
    layers = dict(model.base_model.model.named_modules())
    for name, w in wrappers(mine):
        a, layer = w.adapters["default"], layers[name]
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        sign_a, sign_b = torch.sign((A * a.A).sum(1)), torch.sign((B * a.B).sum(0))  # per singular vector
        torch.testing.assert_close(a.A, A * sign_a[:, None], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(a.B, B * sign_b, atol=1e-4 * float(B.abs().max()), rtol=1e-3)
        layer.base_layer.weight.data.copy_(w.base_layer.weight)  # the residual follows the sign convention
    randomize_adapters(mine, std=0.05)
    state = {
        f"base_model.model.{n}.{k}": t.detach()
        for n, w in wrappers(mine)
        for k, t in w.adapters["default"].export_state().items()
    }
    assert not peft.set_peft_model_state_dict(model, state).unexpected_keys
    torch.testing.assert_close(logits(model.eval(), x), logits(mine, x), atol=1e-5, rtol=1e-5)
    lk.save_adapter(mine, tmp_path / "ours")  # rank 2r plain LoRA on the original base, read alike by PEFT
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["r"] == 8
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded, x), logits(mine, x), atol=1e-5, rtol=0)


def test_peft_dirs_and_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(lk.ConfigError, match="initialises from data"):
        lk.attach(tiny_llama(), lk.method_config("lora", init="lora_ga"))
    with pytest.raises(lk.ConfigError, match="at least 16 are needed"):
        lk.attach(tiny_llama(), lk.method_config("lora", r=8, init="lora_ga"), calibration=batches(b=1, t=8))
    with pytest.raises(lk.ConfigError, match="2r = 96 singular vectors"):
        lk.attach(tiny_llama(), lk.method_config("lora", r=48, init="lora_ga"), calibration=batches())
    with pytest.raises(lk.ConfigError, match="direction"):
        lk.method_config("lora", init="lora_ga", init_options={"direction": "BrA2r"})
    model = peft_lora_ga(batches())
    model.save_pretrained(tmp_path / "residual")  # relative to PEFT's rewritten base: refused
    with pytest.raises(lk.AdapterFormatError, match="path_initial_model_for_weight_conversion"):
        lk.load_adapter(tiny_llama(), tmp_path / "residual")
