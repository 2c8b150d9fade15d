"""The loqt callback in the real training loop: on an NF4 base, the fold after step 2 (merge_every=2; a learning rate
large enough that two steps move NF4 codes) re-quantizes the base codes and restarts B, which step 3 trains again."""

from __future__ import annotations

import torch

import lorakit as lk
from lorakit.inject import wrappers
from lorakit.testing import tiny_llama
from lorakit.train.data import Record
from lorakit.train.loop import TrainConfig, train
from tests.helpers import tokens


def test_the_loop_folds_loqt_adapters_every_merge_every_steps(tmp_path):
    model = lk.quantize(tiny_llama(0), "nf4")
    ids = tokens(batch=4, length=8, seed=7)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    lk.attach(model, lk.method_config("loqt", r=4, merge_every=2), targets=["q_proj", "v_proj"], calibration=batches)
    codes = {n: w.base_layer.weight.detach().clone() for n, w in wrappers(model)}
    folds: list[int] = []
    for _, w in wrappers(model):
        adapter = w.adapters["default"]
        adapter.fold = lambda base, a=adapter: (folds.append(1), type(a).fold(a, base))  # count, then fold
    recs = [Record(r, r) for r in torch.randint(4, 256, (8, 10), generator=torch.Generator()).tolist()]
    train(
        model,
        recs,
        TrainConfig(steps=3, batch_size=2, lr=0.05, callbacks=("loqt",)),
        out_dir=tmp_path,
        pad_id=0,
        progress=False,
    )
    assert len(folds) == len(codes)  # once per layer: after step 2 only
    for name, w in wrappers(model):
        assert not torch.equal(w.base_layer.weight, codes[name])  # the codes hold the folded update
        assert w.adapters["default"].B.abs().sum() > 0  # step 3 trained the restarted B
