"""The shears callback (Shears): before the first update every adapted linear base reaches the target unstructured
sparsity exactly (Wanda's |W|·‖x‖ on the first micro-batch), the masks file rebuilds that sparse base, the masked
merge keeps the sparsity; the elastic super-adapter's sub-adapters extract as PEFT LoRAs equal to the super-adapter
at their config on the sparse base, and the search stays within the parameter budget."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.inject import wrappers
from lorakit.testing import randomize_adapters, tiny_llama
from lorakit.train.callbacks import CALLBACKS, Callback, register_callback
from lorakit.train.callbacks._elastic import batch_loss, elastic_adapters, params
from lorakit.train.callbacks.shears import apply_masks, extract, merge, prune_scores, search, use_config, wanda_prune
from lorakit.train.loop import TrainConfig, train
from tests.helpers import logits, tokens
from tests.train.callbacks._allocators import assert_option_refused, records

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]
R, RANKS = 4, (1, 2, 4)
TARGETS = ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]
X = tokens(batch=2, length=9, seed=5)
SPEC = "shears:ranks=1|2|4,sparsity=0.5"


def lora_model(base=None, method: str = "lora", targets=TARGETS, **opts) -> torch.nn.Module:
    cfg = lk.method_config(method, r=R, **({"alpha": 2.0 * R} if method == "lora" else {}), **opts)
    return lk.attach(tiny_llama(0) if base is None else base, cfg, targets=targets)


def run(model, out, spec=SPEC, steps=8, **cfg):
    opts = dict(steps=steps, batch_size=4, lr=1e-2, schedule="constant", seed=3, callbacks=(spec,)) | cfg
    return train(model, records(8, seed=0), TrainConfig(**opts), out_dir=out, pad_id=0, progress=False)


def zeros(model) -> dict[str, int]:
    return {n: int((w.base_layer.weight == 0).sum()) for n, w in wrappers(model)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("shears")
    model = lora_model()
    run(model, root / "run", spec=f"{SPEC},masks={root / 'masks.safetensors'}")
    lk.save_adapter(model, root / "super")
    return model.eval(), root


def test_prune_scores_drops_exactly_k_of_the_lowest_scores_of_each_row():
    score = torch.rand(7, 10, generator=torch.Generator().manual_seed(1))  # (out, in)
    for sparsity in (0.0, 0.3, 0.5, 0.77):
        pruned = prune_scores(score, sparsity)
        assert int(pruned.sum()) == round(sparsity * score.numel())
        for row, drop in zip(score, pruned, strict=True):
            assert drop.sum() >= int(round(sparsity * 70)) // 7  # Wanda's per-output share at least
            if drop.any() and (~drop).any():
                assert row[drop].max() <= row[~drop].min()  # within a row, the lowest scores go


def test_the_first_update_already_sees_the_exactly_sparse_base(tmp_path):
    model = lora_model()
    numel = {n: w.base_layer.weight.numel() for n, w in wrappers(model)}
    seen = []

    @register_callback("shears_probe", help="Record the base's zeros after each backward (test).")
    class Probe(Callback):
        def after_backward(self, state):
            seen.append(zeros(state.model))

    try:
        run(model, tmp_path, steps=3, callbacks=(SPEC, "shears_probe"))
    finally:
        CALLBACKS.pop("shears_probe")
    assert seen[0] == {n: numel[n] // 2 for n in numel}  # exactly half, before the first optimizer step
    assert all(z == seen[0] for z in seen)  # and kept: the base is frozen
    assert all(v == 0 for v in zeros(lora_model()).values())  # from a dense start


def test_the_sparsity_follows_wandas_metric_on_the_calibration_batch():
    model = lora_model()
    ids = tokens(batch=3, length=10, seed=9)
    w = model.get_submodule("model.layers.0.mlp.down_proj")
    dense = w.base_layer.weight.detach().clone()
    inputs = []
    hook = w.base_layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    norms = inputs[0].double().pow(2).sum(dim=(0, 1)).sqrt()  # ‖X_j‖ over the batch's tokens
    keep = wanda_prune(model, [{"input_ids": ids}], 0.3)
    want = ~prune_scores(dense.abs().double() * norms, 0.3)
    assert keep["model.layers.0.mlp.down_proj"].equal(want)
    assert w.base_layer.weight.equal(dense * want)
    assert int((w.base_layer.weight == 0).sum()) == round(0.3 * dense.numel())


def test_the_masks_file_rebuilds_the_sparse_base(trained):
    model, root = trained
    rebuilt = apply_masks(tiny_llama(0), root / "masks.safetensors")
    for n, w in wrappers(model):
        assert rebuilt.get_submodule(n).weight.equal(w.base_layer.weight), n
        assert int((w.base_layer.weight == 0).sum()) == w.base_layer.weight.numel() // 2


def sparse_base(root):
    return apply_masks(tiny_llama(0), root / "masks.safetensors")


def test_an_extracted_sub_adapter_on_the_sparse_base_equals_the_super_adapter(trained, tmp_path):
    model, root = trained
    config = {n: RANKS[i % len(RANKS)] for i, n in enumerate(elastic_adapters(model))}
    with use_config(model, config):
        want = logits(model, X)
    out = extract(root / "super", config, tmp_path / "sub")
    loaded = lk.load_adapter(sparse_base(root), out)
    assert {n: w.adapters["default"].A.shape[0] for n, w in wrappers(loaded)} == config
    torch.testing.assert_close(logits(loaded, X), want, atol=1e-6, rtol=1e-6)
    peft_model = peft.PeftModel.from_pretrained(sparse_base(root), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(X).logits, want, atol=1e-5, rtol=1e-5)


def test_the_masked_merge_keeps_the_sparsity(trained, tmp_path):
    model, root = trained
    config = dict.fromkeys(elastic_adapters(model), 2)
    loaded = lk.load_adapter(sparse_base(root), extract(root / "super", config, tmp_path / "sub"))
    randomize_adapters(loaded, seed=3)  # a dense ΔW everywhere, so an unmasked merge would fill the zeros
    merged, plain = merge(loaded), lk.merge(loaded)
    for n, w in wrappers(loaded):
        W, dW = w.base_layer.weight, w.adapters["default"].delta_weight(w.base_layer)
        zero = W == 0
        assert int(zero.sum()) == W.numel() // 2
        got = merged.get_submodule(n).weight
        assert got[zero].abs().max() == 0  # the sparsity kept: exactly the same zeros
        torch.testing.assert_close(got[~zero], (W + dW)[~zero], atol=1e-6, rtol=1e-6)  # ΔW added elsewhere
        assert plain.get_submodule(n).weight[zero].abs().max() > 0  # why the mask: a plain merge fills them
    assert zeros(loaded) == {n: int((merged.get_submodule(n).weight == 0).sum()) for n in zeros(loaded)}


def test_the_search_on_the_sparse_super_adapter_stays_within_the_budget(trained):
    model, _ = trained
    adapters = elastic_adapters(model)
    ids = torch.tensor([r.input_ids for r in records(8, seed=0)])
    low, high = (params(adapters, dict.fromkeys(adapters, r)) for r in (1, R))
    for budget in (low, (low + high) // 3, high):
        config = search(model, lambda m: batch_loss(m, [{"input_ids": ids, "attention_mask": None}]), budget, RANKS, 4)
        assert params(adapters, config) <= budget and set(config.values()) <= set(RANKS)


def test_a_budgeted_run_saves_a_sub_adapter_within_the_budget_on_the_sparse_base(tmp_path):
    model = lora_model()
    adapters = elastic_adapters(model)
    budget = params(adapters, dict.fromkeys(adapters, 2))
    run(model, tmp_path / "run", spec=f"{SPEC},budget={budget},samples=3", steps=4)
    ranks = {n: w.adapters["default"].config.r for n, w in wrappers(model)}
    assert params(elastic_adapters(model), ranks) <= budget and set(ranks.values()) <= set(RANKS)
    assert all(zeros(model)[n] == w.base_layer.weight.numel() // 2 for n, w in wrappers(model))  # still sparse


@pytest.mark.parametrize(
    ("case", "spec", "message"),
    [
        ("dora", SPEC, "plain 'lora' adapters"),
        ("embedding", SPEC, "Wanda sparsity is built for full-precision nn.Linear"),
        ("nf4", SPEC, "Wanda sparsity is built for full-precision nn.Linear"),
        ("lora", "shears:ranks=1|8", "largest elastic rank 8 exceeds the attached rank r=4"),
        ("lora", "shears:ranks=1|4,budget=5", "budget=5 must be an integer number of parameters between"),
        ("lora", "shears:ranks=1|4,budget=99999999", "budget=99999999 must be an integer number of parameters"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_base_or_the_adapters_change(tmp_path, case, spec, message):
    if case == "embedding":
        model = lora_model(targets=["q_proj", "embed_tokens"])
    elif case == "nf4":
        model = lora_model(lk.quantize(tiny_llama(0), "nf4"))
    else:
        model = lora_model(method=case if case == "dora" else "lora")
    before = {n: p.detach().clone() for n, p in model.state_dict().items() if p.is_floating_point()}
    with pytest.raises(ConfigError, match=message):
        run(model, tmp_path, spec=spec, steps=2)
    assert all(p.equal(before[n]) for n, p in model.state_dict().items() if n in before)  # base kept dense


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shears:ranks=2,sparsity=1", r"sparsity must be a number in \[0, 1\)"),
        ("shears:ranks=2,sparsity=-0.5", r"sparsity must be a number in \[0, 1\)"),
        ("shears:ranks=2|x", "ranks must be positive integers"),
        ("shears:sparsity=0.5", "it takes: ranks, sparsity, budget"),
    ],
)
def test_bad_options_fail_when_the_config_is_built(spec, message):
    assert_option_refused(spec, message, steps=None)


class Killed(Exception):
    pass


def test_a_resumed_run_is_refused(tmp_path):
    """The sparse base is not in the checkpoint, so a resumed run (on a dense base) cannot go on."""

    def kill(step, _loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(lora_model(), records(8, seed=0), TrainConfig(steps=4, batch_size=4, save_every=2, callbacks=(SPEC,)),
              out_dir=tmp_path, pad_id=0, progress=False, on_step=kill)  # fmt: skip
    with pytest.raises(ConfigError, match="resumed run cannot continue"):
        train(lora_model(), records(8, seed=0), TrainConfig(steps=4, batch_size=4, save_every=2, callbacks=(SPEC,)),
              out_dir=tmp_path, pad_id=0, progress=False, resume=True)  # fmt: skip
