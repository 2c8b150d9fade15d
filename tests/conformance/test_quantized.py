"""QLoRA conformance: every registered method (and every init option on LoRA) on an NF4-quantized tiny Llama.

The base Linear layers are bitsandbytes ``Linear4bit`` (fp32 compute), read by methods through the
``bnb4bit`` base-layer kind. Each case attaches to the q/k/v/o and MLP projections and checks: the init
identity where the method promises one, that the adapter changes the output, that only adapter
parameters train (the quantized codes never change), inference path = training path, save/load onto a
freshly quantized base, that the same adapter on the dequantized base gives the same logits, and merging
onto the quantized base: dequantized (equal to the unmerged forward) and re-quantized (a quantized model
with a drift report for every layer). ``test_qlora_on_the_pure_torch_int4g_base`` runs the same cases, the
main checks in one pass, on lorakit's own integer group quantizer (``int4g``, base-layer kind ``intgroup``).

Excluded, because their math writes into the base weight, which a quantized layer cannot hold: the methods
whose adapters move a part out of the base (LoLDU, SaLoRA: ``base_shift``), the init options that
leave a residual base (PiSSA, LoRA-GA: ``shifts_base``) and LoftQ, which replaces W by its quantized Q
(``replaces_base``: run it on the full-precision model, then quantize; tests/init/test_loftq.py). Attaching
them raises a TargetError that says to run them on the full-precision model and quantize after;
``test_excluded_cases_fail_clearly`` checks it.
"""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit import layers as L
from lorakit.init import INITS
from lorakit.initialize import needs_calibration
from lorakit.methods import REGISTRY
from lorakit.methods._api import AdapterModule
from lorakit.quant import merge_drift, quantized_kinds
from lorakit.testing import randomize_adapters, tiny_llama
from tests.helpers import config_for, idle_params, logits, tokens

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = sorted(REGISTRY) + [f"lora+{i}" for i in sorted(INITS)]


def _writes_base(case: str) -> bool:
    method, _, init = case.partition("+")
    if init:
        return INITS[init].shifts_base or INITS[init].replaces_base
    return REGISTRY[method].adapter.base_shift is not AdapterModule.base_shift


EXCLUDED = [c for c in CASES if _writes_base(c)]
INCLUDED = [c for c in CASES if not _writes_base(c)]


def config(case: str) -> object:
    method, _, init = case.partition("+")
    return config_for(method, r=4, **({"init": init} if init else {}))


def quantized(seed: int = 0) -> torch.nn.Module:
    return lk.quantize(tiny_llama(seed), "nf4")


def adapt(model: torch.nn.Module, case: str, *, randomize: bool = True) -> torch.nn.Module:
    cfg = config(case)
    ids = tokens(batch=4, length=8, seed=7)
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    torch.manual_seed(0)
    needs = needs_calibration(REGISTRY[case.partition("+")[0]], cfg)
    lk.attach(model, cfg, targets=TARGETS, calibration=calibration if needs else None)
    if randomize:
        randomize_adapters(model, seed=0)
    return model


def codes(model: torch.nn.Module) -> list[torch.Tensor]:
    """The packed 4-bit codes of every quantized layer, in module order (wrapping renames, never reorders)."""
    return [p.detach().clone() for p in model.parameters() if p.dtype == torch.uint8]


@pytest.mark.parametrize("case", INCLUDED)
def test_qlora_trains_only_the_adapter(case):
    x = tokens()
    model = quantized()
    y0 = logits(model, x)
    before = codes(model)
    adapt(model, case, randomize=False)
    assert {L.kind_of(w.base_layer).name for _, w in lk.inject.wrappers(model)} == {"bnb4bit"}
    if REGISTRY[case.partition("+")[0]].identity_at_init and (
        "+" not in case or INITS[case.partition("+")[2]].identity_at_init
    ):
        torch.testing.assert_close(logits(model, x), y0, atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if ".adapters." in n}
    model.train()
    model(x, labels=x).loss.backward()
    idle = idle_params(model)  # ofa_quant: only the step's bit-width's LoRA is in the graph
    assert all((p.grad is not None) == (p.requires_grad and n not in idle) for n, p in model.named_parameters())
    randomize_adapters(model, seed=0)
    model.eval()
    assert (logits(model, x) - y0).abs().max() > 1e-3
    after = codes(model)
    assert len(after) == len(before) == 14 and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("case", INCLUDED)
def test_qlora_inference_path_equals_training_path(case):
    model = adapt(quantized(), case)
    x = tokens()
    with torch.enable_grad():
        y_grad = model(x).logits.detach()
    torch.testing.assert_close(logits(model, x), y_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", INCLUDED)
def test_qlora_save_load_and_the_dequantized_base(case, tmp_path):
    x = tokens()
    model = adapt(quantized(), case)
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "adapter")
    again = lk.load_adapter(quantized(), tmp_path / "adapter")
    torch.testing.assert_close(logits(again, x), y, atol=1e-6, rtol=0)
    # the kind reads the weight the bitsandbytes forward uses: the same adapter on the dequantized base agrees
    dense = lk.load_adapter(lk.dequantize(quantized()), tmp_path / "adapter")
    torch.testing.assert_close(logits(dense, x), y, atol=1e-5, rtol=1e-5)
    if REGISTRY[case.partition("+")[0]].mergeable:  # merged onto the quantized base: dense (exact) or re-quantized
        torch.testing.assert_close(logits(lk.merge(model, quantized="dequantize"), x), y, atol=1e-5, rtol=1e-5)
        requantized = lk.merge(model)
        assert quantized_kinds(requantized) == {"bnb4bit"} and len(merge_drift(requantized).drift) == 14


@pytest.mark.parametrize("case", INCLUDED)
def test_qlora_on_the_pure_torch_int4g_base(case, tmp_path):
    """The same cases on lorakit's own integer group quantizer (base-layer kind ``intgroup``), in one pass."""
    x = tokens()
    model = lk.quantize(tiny_llama(0), "int4g")
    y0 = logits(model, x)
    before = codes(model)
    adapt(model, case, randomize=False)
    assert {L.kind_of(w.base_layer).name for _, w in lk.inject.wrappers(model)} == {"intgroup"}
    method, _, init = case.partition("+")
    if REGISTRY[method].identity_at_init and (not init or INITS[init].identity_at_init):
        torch.testing.assert_close(logits(model, x), y0, atol=1e-6, rtol=0)
    model.train()
    model(x, labels=x).loss.backward()
    idle = idle_params(model)
    assert all((p.grad is not None) == (".adapters." in n and n not in idle) for n, p in model.named_parameters())
    randomize_adapters(model, seed=0)
    model.eval()
    y = logits(model, x)
    assert (y - y0).abs().max() > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(before, codes(model), strict=True)) and len(before) == 14
    lk.save_adapter(model, tmp_path / "adapter")
    again = lk.load_adapter(lk.quantize(tiny_llama(0), "int4g"), tmp_path / "adapter")
    torch.testing.assert_close(logits(again, x), y, atol=1e-6, rtol=0)
    if REGISTRY[method].mergeable:
        torch.testing.assert_close(logits(lk.merge(model, quantized="dequantize"), x), y, atol=1e-5, rtol=1e-5)
        assert quantized_kinds(lk.merge(model)) == {"intgroup"}


@pytest.mark.parametrize("case", EXCLUDED)
def test_excluded_cases_fail_clearly(case):
    model = quantized()
    with pytest.raises(lk.TargetError, match="bnb4bit layer holds it quantized.*quantize after"):
        adapt(model, case, randomize=False)
    assert lk.adapter_names(model) == [] and not any(".adapters." in n for n, _ in model.named_parameters())


def test_the_exclusions_are_the_base_writing_cases():
    assert sorted(EXCLUDED) == ["loldu", "lora+loftq", "lora+lora_ga", "lora+pissa", "salora"]
