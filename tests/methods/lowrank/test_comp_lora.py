"""Comp-LoRA: after real optimiser steps the update never enters W₀'s top-k left singular subspace (‖U_kᵀΔW‖ < 1e-5)."""

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.inject import wrappers
from lorakit.testing import tiny_gpt2, tiny_llama
from tests.helpers import logits, tokens


def train(model: torch.nn.Module, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        x = tokens(batch=4, length=16, seed=step)
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval()


def leak(model: torch.nn.Module, k: int) -> dict[str, tuple[float, float]]:
    """{module: (‖U_kᵀΔW‖_F, ‖ΔW‖_F)} with U_k from a float64 SVD of the (unchanged) base weight."""
    out = {}
    for name, wrapper in wrappers(model):
        base, adapter = wrapper.base_layer, wrapper.adapters["default"]
        U = torch.linalg.svd(L.weight_out_in(base).double(), full_matrices=False)[0][:, :k]  # (out, k)
        with torch.no_grad():
            delta = adapter.delta_weight(base)  # base layout
        delta = (delta if isinstance(base, torch.nn.Linear) else delta.T).double()  # (out, in)
        out[name] = (float((U.T @ delta).norm()), float(delta.norm()))
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_update_stays_orthogonal_to_the_top_k_subspace_through_training(make):
    k = 8
    model = make()
    lk.attach(model, lk.method_config("comp_lora", r=4, k=k), targets="all-linear")
    train(model)
    for name, (inside, total) in leak(model, k).items():
        assert total > 1e-3, f"{name}: the adapter did not train"
        assert inside < 1e-5, (name, inside)


def test_plain_lora_does_enter_that_subspace():
    """The same training without the projection puts a clear share of ΔW into U_k (so the test above has teeth)."""
    k = 8
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=4), targets="all-linear")
    train(model)
    assert max(inside / total for inside, total in leak(model, k).values()) > 1e-2


def test_starts_as_the_base_and_merged_equals_forward():
    model, x = tiny_llama(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("comp_lora", r=4, k=8), targets="all-linear")
    assert torch.equal(logits(model, x), y0)  # B = 0
    train(model, steps=2)
    y = logits(model, x)
    assert (y - y0).abs().max() > 1e-3
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_recomputes_the_subspace(tmp_path):
    model, x = tiny_gpt2(), tokens()
    lk.attach(model, lk.method_config("comp_lora", r=4, k=8), targets=["c_attn", "c_fc", "wte"])
    train(model, steps=2)
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "a")
    assert {type(w.adapters["default"]).__name__ for _, w in wrappers(loaded)} == {"CompLora"}
    torch.testing.assert_close(logits(loaded, x), y, atol=1e-6, rtol=0)


def test_clear_errors():
    with pytest.raises(lk.ConfigError, match="k must be a positive integer"):
        lk.method_config("comp_lora", k=0)
    with pytest.raises(lk.ConfigError, match="lora_bias"):
        lk.method_config("comp_lora", lora_bias=True)
    with pytest.raises(lk.ConfigError, match="k=32 must be below d_out=32"):  # k_proj: 64 → 32
        lk.attach(tiny_llama(), lk.method_config("comp_lora", k=32), targets=["k_proj"])


def test_trains_by_name_on_the_cli(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    args = ["train", "--base", str(tiny_checkpoint), "--method", "comp_lora", "--r", "2", "--opt", "k=4"]
    args += ["--steps", "2", "--task", "reverse", "--train-examples", "8", "--eval-examples", "2", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*args, "--max-len", "96", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    loaded = lk.load_adapter(lk.load_base(str(tiny_checkpoint))[0], tmp_path / "a")
    assert {(type(w.adapters["default"]).__name__, w.adapters["default"].config.k) for _, w in wrappers(loaded)} == {
        ("CompLora", 4)
    }
