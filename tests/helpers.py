"""Small shared helpers for the test suite: tiny bases with their target lists, logits, wrapper checks."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import lorakit as lk
from lorakit.inject import AdaptedLayer
from lorakit.methods import REGISTRY
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]
# name -> (builder, targets covering every supported layer kind of that model)
MODELS = {"llama": (tiny_llama, LLAMA_TARGETS), "gpt2": (tiny_gpt2, GPT2_TARGETS)}
TARGETS_BY_CLASS = {"LlamaForCausalLM": LLAMA_TARGETS, "GPT2LMHeadModel": GPT2_TARGETS}
EMBEDDINGS = {"embed_tokens", "wte"}


def targets_for(method: str, targets: list[str]) -> list[str]:
    """``targets`` without the embedding modules when ``method`` does not wrap embeddings."""
    if "embedding" in REGISTRY[method].layers:
        return targets
    return [t for t in targets if t not in EMBEDDINGS]


def tokens(batch: int = 2, length: int = 8, seed: int = 123) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def has_wrappers(model: nn.Module) -> bool:
    return any(isinstance(m, AdaptedLayer) for m in model.modules())


def config_for(method: str, **opts) -> object:
    """``lk.method_config(method, **opts)`` keeping only the options that method has (e.g. a small r)."""
    fields = {f.name for f in dataclasses.fields(REGISTRY[method].config)}
    return lk.method_config(method, **{k: v for k, v in opts.items() if k in fields})


def adapt(
    model: nn.Module,
    method: str,
    name: str = "default",
    seed: int = 0,
    *,
    randomize: bool = True,
    targets=None,
    r: int = 4,
    **opts,
) -> nn.Module:
    """Attach ``method`` (seeded init) to the model's full target list and optionally randomize it."""
    torch.manual_seed(seed)
    targets = targets if targets is not None else targets_for(method, TARGETS_BY_CLASS[type(model).__name__])
    lk.attach(model, config_for(method, r=r, **opts), targets=targets, name=name)
    if randomize:
        randomize_adapters(model, seed=seed)
    return model


def assert_same_as_peft(model: nn.Module, theirs: nn.Module, state: dict, marker: str, base: nn.Module, x) -> None:
    """Load our adapter ``state`` into the PEFT model ``theirs``: every key fits (no unexpected key, no
    missing ``marker`` key), and PEFT's logits equal ``model``'s (1e-5), which differ from ``base``'s."""
    import peft

    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if marker in k]
    y = logits(model, x)
    assert (y - logits(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs.eval(), x), y, atol=1e-5, rtol=1e-5)


def assert_mixed_batch_equals_alone(base: nn.Module, configs: dict, tmp_path, targets="all-linear") -> None:
    """Save one randomised adapter per ``configs`` entry {name: method config} on ``base``, serve them all from one
    engine in one mixed batch (the base alone in a row too): each row equals its adapter alone on a copy of
    the base (1e-4)."""
    import copy

    from lorakit.serve.engine import Engine

    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        model = lk.attach(copy.deepcopy(base), config, targets=targets)
        randomize_adapters(model, seed=10 + i, std=0.3)
        dirs[name] = lk.save_adapter(model, tmp_path / name)
    engine = Engine(copy.deepcopy(base))
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    first, *rest = list(dirs)
    names = [first, None, *rest, first]
    ids = torch.randint(0, 256, (len(names), 7), generator=torch.Generator().manual_seed(1))
    got = engine.forward(ids, names)
    for b, name in enumerate(names):
        alone = copy.deepcopy(base) if name is None else lk.load_adapter(copy.deepcopy(base), dirs[name])
        with torch.no_grad():
            want = alone(ids[b : b + 1]).logits[0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def idle_params(model: nn.Module) -> set[str]:
    """Adapter parameters a step leaves out of the graph by design (so they get no gradient): ofa_quant's LoRA
    pairs of the bit-widths not sampled for the step."""
    from lorakit.methods.lowrank.ofa_quant import OfaQuant

    return {
        f"{w}.adapters.{a}.{f}.{b}"
        for w, m in model.named_modules()
        if isinstance(m, AdaptedLayer)
        for a, ad in m.adapters.items()
        if isinstance(ad, OfaQuant)
        for b in ad.config.bits
        if b != ad.active_bits
        for f in "AB"
    }
