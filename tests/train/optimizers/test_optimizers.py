"""LoRA+ and LoRA-FA: their defining properties, and the same updates as PEFT's optimisers."""

import pytest
import torch
from peft import PeftModel
from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
from safetensors.torch import load_file

import lorakit as lk
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.loop import TrainConfig
from lorakit.train.optimizers import build_optimizer
from lorakit.train.optimizers.adamw import adamw
from lorakit.train.optimizers.lorafa import lorafa_grad
from lorakit.train.optimizers.loraplus import loraplus_groups

X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(5))


def _pair(tmp_path, targets, r=4, alpha=8):
    """The same adapter weights in lorakit and in PEFT (trainable)."""
    ours = tiny_llama()
    lk.attach(ours, lk.method_config("lora", r=r, alpha=alpha), targets=targets)
    randomize_adapters(ours, seed=3, std=0.1)
    lk.save_adapter(ours, tmp_path / "init")
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "init", is_trainable=True)
    return ours, theirs


def _steps(model, opt, n):
    for _ in range(n):
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()


def _compare(tmp_path, ours, theirs, atol):
    lk.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = (
        load_file(tmp_path / "ours" / "adapter_model.safetensors"),
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"),
    )
    init = load_file(tmp_path / "init" / "adapter_model.safetensors")
    moved = 0
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=atol, rtol=0, msg=key)
        moved += int(not torch.equal(value, init[key]))
    assert moved > 0  # the comparison is about real updates


def test_loraplus_matches_peft(tmp_path):
    ours, theirs = _pair(tmp_path, ["q_proj", "v_proj", "embed_tokens"])
    _steps(ours, build_optimizer(ours, TrainConfig(optimizer="loraplus", lr=1e-3, loraplus_ratio=16)), 3)
    _steps(
        theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.0), 3
    )
    _compare(tmp_path, ours, theirs, atol=1e-6)


def test_loraplus_groups_give_B_ratio_times_lr():
    model = tiny_llama()
    lk.attach(model, lk.method_config("dora", r=4), targets=["q_proj", "embed_tokens"])
    groups = loraplus_groups(model, lr=1e-3, ratio=8)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    wrapper = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert id(wrapper.A) in by_lr[1e-3]
    assert id(wrapper.B) in by_lr[8e-3] and id(wrapper.m) in by_lr[8e-3]
    emb = model.model.embed_tokens.adapters["default"]
    assert {id(emb.A), id(emb.B), id(emb.m)} <= by_lr[1e-6]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*by_lr.values()) == trainable


def test_lorafa_matches_peft_and_freezes_A(tmp_path, monkeypatch):
    # PEFT projects the gradient under bf16 autocast where bf16 exists; in fp32 the updates agree to 1e-6
    monkeypatch.setattr("peft.optimizers.lorafa.is_bf16_available", lambda: False)
    ours, theirs = _pair(tmp_path, ["q_proj", "v_proj", "down_proj"])
    A_before = {n: p.detach().clone() for n, p in ours.named_parameters() if n.endswith(".A")}
    _steps(ours, build_optimizer(ours, TrainConfig(optimizer="lorafa", lr=1e-3)), 3)
    _steps(theirs, create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-3), 3)
    _compare(tmp_path, ours, theirs, atol=1e-6)
    for n, p in ours.named_parameters():
        if n.endswith(".A"):
            assert torch.equal(p, A_before[n]) and not p.requires_grad


def test_lorafa_step_is_the_projected_full_gradient():
    """s·g̃_B·A equals the full weight gradient projected onto A's row space."""
    torch.manual_seed(0)
    W = torch.randn(12, 20, requires_grad=True)
    A, B, s = torch.randn(3, 20), torch.randn(12, 3, requires_grad=True), 2.0
    x = torch.randn(7, 20)
    (x @ (W + s * B @ A).T).square().sum().backward()
    G = W.grad  # full gradient: ∂L/∂W
    P = A.T @ torch.linalg.inv(A @ A.T) @ A  # projector onto A's row space
    torch.testing.assert_close(s * lorafa_grad(B.grad, A, s) @ A, G @ P, atol=1e-4, rtol=1e-4)
    assert B.grad is not None and torch.allclose(B.grad, s * G @ A.T, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw", "loraplus", "lorafa"])
def test_every_optimizer_trains_only_adapters(optimizer):
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=4), targets=["q_proj"])
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer))
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    adapter_ids = {id(p) for n, p in model.named_parameters() if ".adapters." in n}
    assert params and params <= adapter_ids


def test_adamw_takes_the_fused_kernel_where_it_runs_with_the_same_update():
    torch.manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    opt = adamw(ours, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    for step in range(3):
        for a, b in zip(ref, ours, strict=True):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(step))
            b.grad = a.grad.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ref, ours, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    meta = torch.nn.Parameter(torch.empty(2, device="meta"))  # no fused kernel there: torch's default path
    assert not adamw([meta], lr=1e-3, weight_decay=0.0).defaults["fused"]
    model = tiny_llama()
    lk.attach(model, lk.method_config("lora", r=4), targets=["q_proj"])
    assert all(g["fused"] for g in build_optimizer(model, TrainConfig(optimizer="loraplus")).param_groups)
