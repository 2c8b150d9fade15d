"""The training loop: learns, touches only adapter weights, logs, and resumes bit-exactly."""

import json

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.testing import tiny_llama
from lorakit.train.data import IGNORE, Record
from lorakit.train.loop import TrainConfig, batch_indices, train


def _records(n=24, length=12, seed=0):
    """A random 4-token prompt, then a completion of one repeated token: a tiny adapter learns it fast."""
    g = torch.Generator().manual_seed(seed)
    recs = []
    for _ in range(n):
        ids = torch.randint(4, 256, (4,), generator=g).tolist() + [42] * (length - 4)
        recs.append(Record(ids, [IGNORE] * 4 + ids[4:]))
    return recs


def _model(method="lora", dropout=0.0):
    # lm_head too: the random tiny model's head has weights of ~0.02, which caps how confident it can get
    model = tiny_llama()
    lk.attach(
        model, lk.method_config(method, r=4, dropout=dropout), targets=["q_proj", "v_proj", "down_proj", "lm_head"]
    )
    return model


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_falls_and_only_adapters_change(tmp_path):
    model = _model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(
        model, _records(), TrainConfig(steps=30, batch_size=8, lr=3e-2), out_dir=tmp_path, pad_id=0, progress=False
    )
    assert result.losses[-1] < 0.7 * result.losses[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert lines[0]["loss"] == pytest.approx(result.losses[0])
    assert not model.training  # the loop hands the model back in eval mode


class Killed(Exception):
    pass


@pytest.mark.parametrize("method, optimizer", [("lora", "adamw"), ("dora", "loraplus"), ("lora", "lorafa")])
def test_resume_after_kill_equals_uninterrupted(tmp_path, method, optimizer):
    cfg = TrainConfig(steps=12, batch_size=4, lr=1e-2, save_every=4, optimizer=optimizer, warmup=2)
    records = _records()
    torch.manual_seed(1)
    full = _model(method, dropout=0.1)  # dropout: the RNG state must be restored too
    train(full, records, cfg, out_dir=tmp_path / "full", pad_id=0, progress=False)

    def kill(step, loss):
        if step == 10:
            raise Killed

    torch.manual_seed(1)
    first = _model(method, dropout=0.1)
    with pytest.raises(Killed):
        train(first, records, cfg, out_dir=tmp_path / "run", pad_id=0, progress=False, on_step=kill)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    torch.manual_seed(2)  # a different process: nothing but the checkpoint carries state over
    second = _model(method, dropout=0.1)
    result = train(second, records, cfg, out_dir=tmp_path / "run", pad_id=0, progress=False, resume=True)
    assert result.resumed_from == 8
    for name, value in _adapter_state(full).items():
        assert torch.equal(value, _adapter_state(second)[name]), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-4:] == [9, 10, 11, 12]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # a finished run leaves no checkpoint


def test_batch_order_is_a_permutation_per_epoch():
    seen = [i for k in range(3) for i in batch_indices(10, 4, k, seed=0)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 4, 5, seed=0) == batch_indices(10, 4, 5, seed=0)


def test_grad_accumulation_matches_a_big_batch(tmp_path):
    records = _records(n=8)
    torch.manual_seed(0)
    a = _model()
    train(
        a,
        records,
        TrainConfig(steps=1, batch_size=8, lr=1e-2, max_grad_norm=None),
        out_dir=tmp_path / "a",
        pad_id=0,
        progress=False,
    )
    torch.manual_seed(0)
    b = _model()
    # the same 8 records, seen as 2 micro-batches of 4 (all sequences have the same number of labels)
    train(
        b,
        records,
        TrainConfig(steps=1, batch_size=4, grad_accum=2, lr=1e-2, max_grad_norm=None),
        out_dir=tmp_path / "b",
        pad_id=0,
        progress=False,
    )
    for name, value in _adapter_state(a).items():
        torch.testing.assert_close(value, _adapter_state(b)[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"lr": 0.0},
        {"schedule": "step"},
        {"optimizer": "sgd"},
        {"mixed_precision": "int8"},
        {"warmup": -1},
    ],
)
def test_bad_train_config(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="attach an adapter first"):
        train(tiny_llama(), _records(), TrainConfig(steps=1), out_dir=tmp_path, pad_id=0, progress=False)


def test_an_adapter_regularizer_is_added_to_the_loss_and_plain_lora_walks_no_modules(tmp_path, monkeypatch):
    """The step loss is the model's loss plus the mean of the active adapters' ``regularizer`` terms (AdaLoRA's
    orthogonality penalty); with methods that define none, no step looks for one."""
    from lorakit.train import loop
    from lorakit.train.loss import regularization, training_loss
    from lorakit.train.optimizers import active_adapters

    recs = [Record(ids, ids) for ids in torch.randint(4, 256, (4, 10), generator=torch.Generator()).tolist()]
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-9)
    model = lk.attach(tiny_llama(0), lk.method_config("adalora", r=4, orth_reg_weight=0.3), targets=["q_proj"])
    adapters = [a for a, _ in active_adapters(model)]
    batch = loop.collate([recs[i] for i in batch_indices(4, 4, 0, 0)], 0)
    with torch.no_grad():
        expected = float(training_loss(model, batch) + regularization(adapters))
        assert float(regularization(adapters)) > 0.1
    got = train(model, recs, cfg, out_dir=tmp_path / "ada", pad_id=0, progress=False).losses[0]
    assert got == pytest.approx(expected, rel=1e-5)
    calls: list[int] = []
    monkeypatch.setattr(loop, "_regularized", lambda m: calls.append(1) or [])
    train(lk.attach(tiny_llama(0), lk.method_config("lora", r=2)), recs, cfg, out_dir=tmp_path / "lora", pad_id=0)
    assert calls == [1]  # once, before the first step
