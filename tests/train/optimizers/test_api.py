"""The optimizer registry: TrainConfig and the builder read it, an unknown name is a clear error, and a
new optimizer is one registered function."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.testing import tiny_llama
from lorakit.train.loop import TrainConfig
from lorakit.train.optimizers import OPTIMIZERS, build_optimizer, optimizer_names, register_optimizer


def test_builtins_are_registered_with_their_papers():
    assert {"adamw", "loraplus", "lorafa"} <= set(OPTIMIZERS)
    assert optimizer_names() == ", ".join(sorted(OPTIMIZERS))
    for spec in OPTIMIZERS.values():
        assert spec.help and spec.paper and spec.url.startswith("https://")


def test_unknown_optimizer_is_a_clear_error_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown optimizer 'lorapls'\. Did you mean 'loraplus'") as e:
        TrainConfig(optimizer="lorapls")
    assert f"Registered optimizers: {optimizer_names()}." in str(e.value)


def test_lorafa_on_a_method_without_an_a_b_pair_is_a_clear_error():
    model = tiny_llama()
    lk.attach(model, lk.method_config("fourierft"), targets=["q_proj"])
    with pytest.raises(ConfigError, match="LoRA-FA needs an A·B adapter; FourierFT has no A, B and scale"):
        build_optimizer(model, TrainConfig(optimizer="lorafa"))


def test_a_new_optimizer_is_one_registered_function():
    @register_optimizer("sgd_test", help="Plain SGD (test).", paper="-", url="https://example.org")
    def build(model, cfg):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)

    try:
        model = tiny_llama()
        lk.attach(model, lk.method_config("lora", r=2), targets=["q_proj"])
        opt = build_optimizer(model, TrainConfig(optimizer="sgd_test", lr=0.5))
        assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.5
        with pytest.raises(ValueError, match="registered twice"):
            register_optimizer("sgd_test", help="", paper="", url="")(lambda model, cfg: opt)
    finally:
        OPTIMIZERS.pop("sgd_test")
