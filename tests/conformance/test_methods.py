"""Every registered method, and every registered init on every method it applies to, × every supported
layer kind, through the same checks.

Parametrised from ``lorakit.methods.REGISTRY`` and ``lorakit.init.INITS``: a method or an init is tested
the moment it registers (an init as ``method+init``, e.g. ``dora+pissa``). Behaviour the paper does not
promise is keyed on the flags (identity_at_init, mergeable). Inits that read data get tiny calibration
batches in every attach; ones that rewrite the base weight (PiSSA, LoRA-GA, and methods with their own
base_shift) are identities in that the residual base plus the adapter reproduces the original outputs,
and save relative to the original base (rank r + r_shift).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.init import INITS
from lorakit.initialize import needs_calibration
from lorakit.inject import AdaptedLayer
from lorakit.methods import REGISTRY
from lorakit.methods.lowrank.lora import LoraConfig
from lorakit.testing import randomize_adapters
from tests.helpers import EMBEDDINGS, MODELS, TARGETS_BY_CLASS, config_for, has_wrappers, idle_params, logits, tokens


@dataclasses.dataclass(frozen=True)
class Case:
    """A method, or a method with an init option, and the flags the checks key on."""

    method: str
    init: str | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        own = REGISTRY[self.method].layers
        return own if self.init is None else tuple(k for k in own if k in INITS[self.init].layers)

    @property
    def identity_at_init(self) -> bool:
        return REGISTRY[self.method].identity_at_init and (self.init is None or INITS[self.init].identity_at_init)

    @property
    def mergeable(self) -> bool:
        return REGISTRY[self.method].mergeable

    def config(self, **opts: object) -> object:
        return config_for(self.method, **opts) if self.init is None else config_for(self.method, init=self.init, **opts)

    def __str__(self) -> str:
        return self.method if self.init is None else f"{self.method}+{self.init}"


# a method whose forward quantizes W itself: a bf16 base moves codes across rounding boundaries (a whole
# quantization step per flipped code, not bf16's rounding error), so its logits are not within bf16 tolerance
BF16_EXCLUDED = {
    "ofa_quant": "ofa_quant quantizes W in its forward: bf16-rounded W flips 2-bit codes",
    "efficientdm": "efficientdm quantizes W + s·B·A in its forward: bf16-rounded W and steps flip 0.3% of its codes",
}
SPECS = {str(c): c for c in [Case(m) for m in REGISTRY] + [Case(m, i) for i in INITS for m in INITS[i].methods]}
METHODS = sorted(SPECS)
CASES = [pytest.param(m, k, id=f"{m}-{k}") for m in METHODS for k in MODELS]


@pytest.fixture
def x() -> torch.Tensor:
    return tokens()


def fresh(kind: str, seed: int = 0) -> nn.Module:
    return MODELS[kind][0](seed)


def calibration(method: str) -> list[dict[str, torch.Tensor]] | None:
    """Calibration batches (32 token rows, labels = inputs) for methods whose init reads data, else None."""
    case = SPECS[method]
    if not needs_calibration(REGISTRY[case.method], case.config(r=4)):
        return None
    ids = tokens(batch=4, length=8, seed=7)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def shifts_base(model: nn.Module) -> bool:
    """The init rewrote the base weight (W_res = W − shift); disabling the adapter leaves W_res."""
    return any(a.base_shift() is not None for _, w in adapted_layers(model) for a in w.adapters.values())


def rewrites_base(model: nn.Module, method: str) -> bool:
    """The init shifted the base (above) or replaced it (LoftQ's Q); disabling the adapter leaves that base."""
    init = SPECS[method].init
    return shifts_base(model) or (init is not None and INITS[init].replaces_base)


def targets_for(method: str, targets: list[str]) -> list[str]:
    """``targets`` without the embedding modules when the case does not wrap embeddings."""
    return targets if "embedding" in SPECS[method].layers else [t for t in targets if t not in EMBEDDINGS]


def adapt(model: nn.Module, method: str, name: str = "default", seed: int = 0, *, randomize: bool = True):
    """tests.helpers.adapt (seeded init, r=4, every supported layer kind) plus calibration where needed."""
    torch.manual_seed(seed)
    targets = targets_for(method, TARGETS_BY_CLASS[type(model).__name__])
    lk.attach(model, SPECS[method].config(r=4), targets=targets, name=name, calibration=calibration(method))
    if randomize:
        randomize_adapters(model, seed=seed)
    return model


def plain_lora(cfg: object, like: object) -> object:
    """``cfg`` as it reads back from a PEFT-format dir whose config reads as ``like``: the LoRA options of a
    LoRA-shaped config, its init done (a registered init's result is in the weights), but for an init whose
    replaced base the loader rebuilds (LoftQ), which reads back as itself."""
    if not isinstance(cfg, LoraConfig) or not isinstance(like, LoraConfig):
        return cfg
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(type(like))}
    if fields["init"] not in ("default", "gaussian") and not INITS[fields["init"]].replaces_base:
        fields |= {"init": "default", "init_options": ()}
    return type(like)(**fields)


def adapted_layers(model: nn.Module) -> list[tuple[str, AdaptedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


def out_in(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """A delta in the base's own layout turned to (out, in): Linear is already; Conv1D/Embedding are (in, out)."""
    return delta if isinstance(base, nn.Linear) else delta.T


@pytest.mark.parametrize("method, kind", CASES)
def test_wraps_every_layer_kind(method, kind):
    model = adapt(fresh(kind), method, randomize=False)
    kinds = {type(w.base_layer) for _, w in adapted_layers(model)}
    assert (nn.Embedding in kinds) == ("embedding" in SPECS[method].layers)
    assert nn.Linear in kinds or Conv1D in kinds
    assert lk.adapter_names(model) == ["default"] and lk.active_adapter(model) == "default"


@pytest.mark.parametrize("method, kind", CASES)
def test_identity_at_init(method, kind, x):
    if not SPECS[method].identity_at_init:
        pytest.skip(f"{method}'s init is not an identity")
    model = fresh(kind)
    y0 = logits(model, x)
    adapt(model, method, randomize=False)
    torch.testing.assert_close(logits(model, x), y0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, kind", CASES)
def test_randomized_adapter_changes_output(method, kind, x):
    model = fresh(kind)
    y0 = logits(model, x)
    adapt(model, method)
    assert (logits(model, x) - y0).abs().max() > 1e-3


@pytest.mark.parametrize("method, kind", CASES)
def test_inference_path_equals_training_path(method, kind, x):
    model = adapt(fresh(kind), method)
    with torch.enable_grad():
        y_grad = model(x).logits.detach()
    torch.testing.assert_close(logits(model, x), y_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method, kind", CASES)
def test_merge_equals_forward_and_leaves_model_untouched(method, kind, x):
    model = adapt(fresh(kind), method)
    y = logits(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if not SPECS[method].mergeable:
        with pytest.raises(lk.ConfigError, match=method):
            lk.merge(model)
        return
    merged = lk.merge(model)
    assert not has_wrappers(merged) and lk.adapter_names(merged) == []
    torch.testing.assert_close(logits(merged, x), y, atol=1e-5, rtol=1e-5)
    # the original is still the adapted model, bit for bit
    assert has_wrappers(model) and lk.adapter_names(model) == ["default"]
    assert torch.equal(logits(model, x), y)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the merged model is a plain base: same parameter names as a fresh one
    assert set(merged.state_dict()) == set(fresh(kind).state_dict())


@pytest.mark.parametrize("method, kind", CASES)
def test_save_load_round_trip(method, kind, x, tmp_path):
    model = adapt(fresh(kind), method)
    y = logits(model, x)
    lk.save_adapter(model, tmp_path / "adapter")
    loaded = lk.load_adapter(fresh(kind), tmp_path / "adapter", name="again")
    assert lk.adapter_names(loaded) == ["again"]
    torch.testing.assert_close(logits(loaded, x), y, atol=1e-6, rtol=0)
    ours = {n: w.adapters["default"].config for n, w in adapted_layers(model)}
    theirs = {n: w.adapters["again"].config for n, w in adapted_layers(loaded)}
    if shifts_base(model):  # saved for the original base: rank r + rank of the shift (own format or plain LoRA)
        extra = {n: w.adapters["default"].base_shift().A.shape[0] for n, w in adapted_layers(model)}
        own = {n: w.adapters["default"].init_shift is not None for n, w in adapted_layers(model)}
        assert {n: (type(c).__name__, c.r) for n, c in theirs.items()} == {
            n: (type(c).__name__ if own[n] else "LoraConfig", c.r + extra[n]) for n, c in ours.items()
        }
    else:  # an init saved in PEFT's format (peft_type LORA) loads back with the same LoRA options
        assert {n: plain_lora(c, theirs.get(n)) for n, c in ours.items()} == theirs


@pytest.mark.parametrize("method, kind", CASES)
def test_only_adapter_parameters_train(method, kind, x):
    model = adapt(fresh(kind), method, randomize=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_params = {n for n, _ in model.named_parameters() if ".adapters." in n}
    assert trainable and trainable == adapter_params
    model.train()
    model(x, labels=x).loss.backward()
    idle = idle_params(model)  # ofa_quant: only the step's bit-width's LoRA is in the graph
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (p.requires_grad and n not in idle), n
    for name, wrapper in adapted_layers(model):
        adapter = wrapper.adapters["default"]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters()), f"{name}: no gradient"
        trains_b = isinstance(getattr(adapter, "B", None), nn.Parameter) and adapter.B.requires_grad
        if trains_b and not isinstance(wrapper.base_layer, nn.Embedding):  # (LoRA-SB's B is a frozen buffer)
            assert adapter.B.grad.abs().sum() > 0, f"{name}: B gets no gradient at zero init"


@pytest.mark.parametrize("method, kind", CASES)
def test_named_adapters_switch_disable_and_delete(method, kind, x):
    model = fresh(kind)
    y0 = logits(model, x)
    plain_keys = set(model.state_dict())
    adapt(model, method, "a", seed=1)
    adapt(model, method, "b", seed=2)
    assert lk.adapter_names(model) == ["a", "b"] and lk.active_adapter(model) == "b"
    yb = logits(model, x)
    lk.set_active(model, "a")
    ya = logits(model, x)
    assert (ya - yb).abs().max() > 1e-3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".adapters.a." in n
    }
    # a base-rewriting init: "a" and "b" both live on the base as "b" left it, and disabling leaves that base
    shifted = rewrites_base(model, method)
    if not shifted:
        for name, seed, y in (("a", 1, ya), ("b", 2, yb)):  # each equals a model holding only that adapter
            torch.testing.assert_close(logits(adapt(fresh(kind), method, name, seed=seed), x), y, atol=1e-6, rtol=0)
    with lk.disabled(model) as m:
        y_base = logits(m, x)
        assert shifted or torch.equal(y_base, y0)
    assert lk.active_adapter(model) == "a" and torch.equal(logits(model, x), ya)
    lk.delete_adapter(model, "a")
    assert lk.adapter_names(model) == ["b"] and has_wrappers(model)
    assert torch.equal(logits(model, x), y_base)  # the active adapter is gone: the base remains
    lk.set_active(model, "b")
    torch.testing.assert_close(logits(model, x), yb, atol=1e-6, rtol=0)
    lk.delete_adapter(model, "b")
    assert lk.adapter_names(model) == [] and not has_wrappers(model)
    assert set(model.state_dict()) == plain_keys and torch.equal(logits(model, x), y_base)


@pytest.mark.parametrize("method, kind", CASES)
def test_bf16(method, kind, x):
    if method in BF16_EXCLUDED:
        pytest.skip(BF16_EXCLUDED[method])
    model = adapt(fresh(kind), method)
    y32 = logits(model, x)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    y16 = logits(model, x)
    assert torch.isfinite(y16).all()
    torch.testing.assert_close(y16, y32, atol=0.05 * float(y32.abs().max()), rtol=0.05)


@pytest.mark.parametrize("method, kind", CASES)
def test_attach_to_bf16_base(method, kind, x):
    model = fresh(kind).to(torch.bfloat16)
    y0 = logits(model, x)
    adapt(model, method, randomize=False)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if ".adapters." in n)
    if SPECS[method].identity_at_init:  # a rewritten base W − shift is rounded to bf16 as well
        torch.testing.assert_close(logits(model, x), y0, atol=2e-2 if shifts_base(model) else 1e-2, rtol=0)
    if SPECS[method].mergeable:
        noisy = adapt(fresh(kind).to(torch.bfloat16), method)
        assert torch.isfinite(logits(lk.merge(noisy), x)).all()


@pytest.mark.parametrize("method, kind", CASES)
def test_to_lora_fidelity(method, kind):
    model = adapt(fresh(kind), method)
    for name, wrapper in adapted_layers(model):
        base, adapter = wrapper.base_layer, wrapper.adapters["default"]
        with torch.no_grad():
            delta = out_in(base, adapter.delta_weight(base)).float()  # (out, in)
        assert delta.shape == out_in(base, base.weight).shape, name
        tail = svd_tail(delta)
        f = adapter.to_lora(base)
        k = f.A.shape[0]
        assert f.A.shape == (k, delta.shape[1]) and f.B.shape == (delta.shape[0], k), name
        # the default form is the best approximation at its own rank (exact when delta's rank <= k)
        err = float((f.scale * (f.B @ f.A) - delta).norm())
        assert err == pytest.approx(tail[k], abs=1e-5 + 1e-4 * tail[0]), name
        if method == "lora":
            torch.testing.assert_close(f.scale * (f.B @ f.A), delta, atol=1e-7, rtol=1e-6)
        full = min(delta.shape)
        errors = []
        for rank in (1, 2, 3, full):
            f = adapter.to_lora(base, rank=rank)
            assert f.A.shape[0] <= rank, name
            approx = f.scale * (f.B @ f.A)
            errors.append(float((approx - delta).norm()))
            assert errors[-1] <= tail[0] * (1 + 1e-5), name  # never worse than the zero update
            assert errors[-1] == pytest.approx(tail[min(rank, full)], abs=1e-5 + 1e-4 * tail[0]), (name, rank)
        torch.testing.assert_close(approx, delta, atol=1e-4, rtol=0)  # full rank reconstructs delta
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(errors)), (name, errors)


def svd_tail(delta: torch.Tensor) -> list[float]:
    """tail[k] = ‖delta − best rank-k approximation‖_F = sqrt(Σ_{i≥k} σ_i²); tail[0] = ‖delta‖_F."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    return [float(s2[k:].sum().sqrt()) for k in range(s2.numel() + 1)]
