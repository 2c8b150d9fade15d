"""SaLoRA: C = I − U_C U_Cᵀ from safety features; the adapter has no effect on that subspace (‖P_safe·ΔW·x‖ = 0)."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import logits, tokens


class Toy(nn.Module):
    """input_ids → fixed feature rows (an embedding table) → the Linear ``lin`` SaLoRA adapts."""

    def __init__(self, feats: torch.Tensor, d_out: int):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(feats, freeze=True)
        self.lin = nn.Linear(feats.shape[1], d_out)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def test_synthetic_safety_features_give_the_exact_subspace_and_zero_effect_on_it():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, k = 16, 12, 3
    V = torch.randn(k, d_in, generator=g)  # the safety features live in span(V): X = coeffs @ V
    model = Toy(torch.randn(10, k, generator=g) @ V, d_out)
    W = model.lin.weight.detach().clone()  # (out, in)
    Q = torch.linalg.qr(W @ V.T)[0]  # (out, k): an orthonormal basis of the safety features W·X
    P_safe = Q @ Q.T
    batch = {"input_ids": torch.arange(10).reshape(2, 5)}
    lk.attach(model, lk.method_config("salora", r=2, safety_rank=k), targets=["lin"], calibration=[batch])
    adapter = model.lin.adapters["default"]
    torch.testing.assert_close(adapter.Uc @ adapter.Uc.T, P_safe, atol=1e-5, rtol=0)
    randomize_adapters(model, seed=1, std=0.5)  # any A, B: the projection holds whatever they are
    x = torch.randn(7, d_in, generator=g)
    with torch.no_grad():
        delta = adapter.delta_weight(model.lin.base_layer)  # (out, in)
        effective = model.lin.base_layer.weight + delta  # W_res + s·C·B·A
    assert float((delta @ x.T).norm()) > 1e-2
    assert float((P_safe @ delta @ x.T).norm()) < 1e-5  # ‖P_safe·ΔW·x‖ = 0
    assert float((P_safe @ (effective - W)).norm()) < 1e-5  # along the safety features the layer is W's


def safety_batches() -> list[dict[str, torch.Tensor]]:
    """Two 'harmful prompt + safe response' batches: labels are -100 on the prompt, so only responses count."""
    out = []
    for seed in (10, 11):
        ids = tokens(batch=2, length=12, seed=seed)
        labels = ids.clone()
        labels[:, :4] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def response_inputs(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Reference capture: the rows each module's input had at response tokens, on the plain original model."""
    rows = {n: [] for n in names}
    mask = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _, a, n=n: rows[n].append(a[0][mask["m"]]))
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            mask["m"] = b["labels"] != -100
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in rows.items()}


def test_training_never_moves_the_safety_features_of_tiny_llama():
    k = 8
    original, model, x = tiny_llama(), tiny_llama(), tokens()
    y0 = logits(model, x)
    lk.attach(model, lk.method_config("salora", r=4, safety_rank=k), targets="all-linear", calibration=safety_batches())
    torch.testing.assert_close(logits(model, x), y0, atol=1e-5, rtol=0)  # W_res + s·C·B₀·A₀ = W
    names = [n for n, _ in wrappers(model)]
    feats = response_inputs(original, names, safety_batches())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        batch = tokens(batch=4, length=16, seed=step)
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        opt.step()
    for name, wrapper in wrappers(model):
        a, base = wrapper.adapters["default"], wrapper.base_layer
        W = original.get_submodule(name).weight.detach().double()  # (out, in)
        F = feats[name] @ W.T  # (n, out): the safety features W·X
        U = torch.linalg.svd(F, full_matrices=False)[2][:k].T  # (out, k): their top-k directions
        torch.testing.assert_close(a.Uc.double() @ a.Uc.double().T, U @ U.T, atol=1e-5, rtol=0)
        with torch.no_grad():
            effective = (base.weight + a.delta_weight(base)).double()  # the trained layer, (out, in)
        change = feats[name] @ (effective - W).T  # (n, out): how the trained layer moved the safety features
        assert float(change.norm()) > 1e-3, f"{name}: nothing trained"
        assert float((change @ U).norm()) < 1e-5 * float(F.norm()), name  # ... but never along U_C


def test_saved_adapter_reproduces_the_trained_model_on_the_original_base(tmp_path):
    model, x = tiny_llama(), tokens()
    lk.attach(model, lk.method_config("salora", r=4, safety_rank=8), targets="all-linear", calibration=safety_batches())
    randomize_adapters(model, seed=2)
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(logits(lk.load_adapter(tiny_llama(), tmp_path / "a"), x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.merge(model), x), y, atol=1e-5, rtol=1e-5)


def test_clear_errors_for_bad_calibration_and_shapes():
    cfg = lk.method_config("salora", r=4, safety_rank=8)
    with pytest.raises(lk.ConfigError, match="initialises from data"):
        lk.attach(tiny_llama(), cfg, targets="all-linear")
    with pytest.raises(lk.ConfigError, match="empty"):
        lk.attach(tiny_llama(), cfg, targets="all-linear", calibration=[])
    with pytest.raises(lk.ConfigError, match="no 'input_ids'"):
        lk.attach(tiny_llama(), cfg, targets="all-linear", calibration=[{"ids": tokens()}])
    with pytest.raises(lk.ConfigError, match="at least 8 are needed"):
        lk.attach(tiny_llama(), cfg, targets="all-linear", calibration=[{"input_ids": tokens(batch=1, length=4)}])
    few = {"input_ids": tokens(batch=1, length=12), "labels": torch.full((1, 12), -100)}
    few["labels"][0, -3:] = 1
    model = tiny_llama()
    with pytest.raises(lk.ConfigError, match="saw 3 safety feature rows"):
        lk.attach(model, cfg, targets="all-linear", calibration=[few])
    assert lk.adapter_names(model) == [] and torch.equal(logits(model, tokens()), logits(tiny_llama(), tokens()))
    with pytest.raises(lk.ConfigError, match="safety_rank < d_out"):
        lk.attach(tiny_llama(), lk.method_config("salora", safety_rank=32), targets=["k_proj"], calibration=[])
    with pytest.raises(lk.TargetError, match="salora"):
        lk.attach(tiny_llama(), cfg, targets=["embed_tokens"], calibration=safety_batches())


def test_trains_by_name_on_the_cli(tiny_checkpoint, tmp_path):
    """`lorakit train --method salora --init-batches N`: C comes from the first N batches; saved as rank-2r LoRA."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    args = ["train", "--base", str(tiny_checkpoint), "--method", "salora", "--r", "2", "--opt", "safety_rank=4"]
    args += ["--init-batches", "2", "--steps", "2", "--task", "reverse", "--train-examples", "8"]
    args += ["--eval-examples", "2", "--batch-size", "4", "--max-len", "96", "--out", str(tmp_path / "a")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = lk.load_adapter(lk.load_base(str(tiny_checkpoint))[0], tmp_path / "a")
    assert {w.adapters["default"].config.r for _, w in wrappers(loaded)} == {4}
