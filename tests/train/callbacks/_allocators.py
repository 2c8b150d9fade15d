"""Shared scaffolding for the rank-allocator callback tests: the training records, the per-module ranks, a run that
captures the callback instance the loop builds, the PEFT round trip and the two refusal checks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import tiny_llama
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig, train
from tests.helpers import logits, tokens

TARGETS = ["q_proj", "v_proj", "up_proj"]
X = tokens(batch=2, length=10, seed=5)  # the input the tests compare logits on


def records(n: int = 16, length: int = 12, seed: int = 11, prompt: int = 0) -> list[Record]:
    """n rows of random tokens in [4, 256), labels the inputs (the first `prompt` of them -100 when prompt > 0)."""
    rows = torch.randint(4, 256, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    if prompt:
        return [Record(r, [-100] * prompt + r[prompt:]) for r in rows]
    return [Record(r, r) for r in rows]


def ranks(model: torch.nn.Module) -> dict[str, int]:
    """Each adapted module's rank, by name."""
    return {name: w.adapters["default"].config.r for name, w in wrappers(model)}


def four_modules(method: str = "lora", r: int = 3) -> torch.nn.Module:
    """tiny_llama(0) with `method` adapters of rank `r` on q_proj and v_proj: 4 modules."""
    return lk.attach(tiny_llama(0), lk.method_config(method, r=r), targets=["q_proj", "v_proj"])


def train_capturing(
    cls: type,
    model: torch.nn.Module,
    cfg: TrainConfig,
    out_dir: Path,
    patches: dict[str, Callable] | None = None,
    data: list[Record] | None = None,
):
    """Train `model` with `cfg` (`patches` set on `cls` meanwhile); return the last `cls` instance the loop built."""
    captured: list = []
    init = cls.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        captured.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "__init__", keep)
        for name, value in (patches or {}).items():
            mp.setattr(cls, name, value)
        train(model, records() if data is None else data, cfg, out_dir=out_dir, pad_id=0, progress=False)
    return captured[-1]


def assert_peft_loads_same(base: torch.nn.Module, model: torch.nn.Module, path: Path, x: torch.Tensor):
    """Save `model` at `path`: PEFT (1e-5) and lorakit (1e-6) on copies of `base` match it; gives (path, PEFT)."""
    peft = pytest.importorskip("peft")
    path = lk.save_adapter(model, path)
    y = logits(model, x)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    torch.testing.assert_close(logits(theirs, x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lk.load_adapter(copy.deepcopy(base), path), x), y, atol=1e-6, rtol=0)
    return path, theirs


def assert_refused_before_first_step(
    cls: type,
    model: torch.nn.Module,
    spec: str,
    match: str,
    tmp_path: Path,
    steps: int = 4,
    hook: str = "after_backward",
    data: list[Record] | None = None,
) -> None:
    """Training `model` with callback `spec` is a ConfigError matching `match`, raised before `cls.hook` runs once."""
    ran: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, hook, lambda self, state: ran.append(state.step))
        with pytest.raises(ConfigError, match=match):
            cfg = TrainConfig(steps=steps, batch_size=2, callbacks=(spec,))
            train(model, records() if data is None else data, cfg, out_dir=tmp_path, pad_id=0)
    assert not ran


def assert_option_refused(spec: str, match: str, steps: int | None = 10) -> None:
    """A TrainConfig with callback `spec` (and `steps`; None: the default) is a ConfigError matching `match`."""
    with pytest.raises(ConfigError, match=match):
        TrainConfig(callbacks=(spec,), **({} if steps is None else {"steps": steps}))
