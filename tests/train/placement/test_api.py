"""The placement registry: spec parsing (auto:NAME[:KEY=VALUE,...]), both methods registered, unknown names and
bad options as clear ConfigErrors (before any model loads in a run), registration rules, and a choice that is
not a usable target list refused."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError, TargetError
from lorakit.testing import tiny_llama
from lorakit.train.placement import (
    PLACEMENTS,
    Placement,
    build_placement,
    check_placement,
    is_placement,
    place,
    placement_names,
    register_placement,
    split_placement,
)
from lorakit.train.run import RunSpec
from tests.train.placement.toy import batches


def test_both_methods_are_registered():
    assert {"plop", "diffora"} <= set(PLACEMENTS)
    assert "auto:plop" in placement_names() and "auto:diffora" in placement_names()
    assert all(spec.help for spec in PLACEMENTS.values())


def test_spec_syntax():
    assert split_placement("auto:plop") == ("plop", {})
    assert split_placement("plop:k=3") == ("plop", {"k": 3})
    assert split_placement(" auto:diffora:k=4, per=type ,gate-lr=0.1") == (
        "diffora",
        {"k": 4, "per": "type", "gate_lr": 0.1},
    )
    assert is_placement("auto:plop") and not is_placement("all-linear") and not is_placement(["auto:plop"])
    assert build_placement("auto:plop:k=3").k == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("auto:plopp", "unknown placement 'plopp'. Did you mean 'plop'"),
        ("auto:", "names no method"),
        ("auto:plop:k", "expected auto:NAME:KEY=VALUE"),
        ("auto:plop:budget=3", "placement 'plop' got budget option.*it takes: k"),
        ("auto:plop:k=0", "k must be a positive integer"),
        ("auto:plop:k=two", "k must be a positive integer"),
        ("auto:plop:k=true", "k must be a positive integer"),
        ("auto:diffora:per=layer", "per must be 'module' or 'type'"),
        ("auto:diffora:steps=-1", "steps must be a positive integer"),
        ("auto:diffora:r=1.5", "r must be a positive integer"),
        ("auto:diffora:lr=0", "lr must be a positive number"),
        ("auto:diffora:gate_lr=fast", "gate_lr must be a positive number"),
    ],
)
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_placement(spec)


def test_a_run_refuses_a_bad_placement_before_loading_anything():
    with pytest.raises(ConfigError, match="unknown placement 'nope'"):
        RunSpec(base="/no/such/checkpoint", task="addition", targets="auto:nope")
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        RunSpec(base="/no/such/checkpoint", task="addition", targets="auto:plop:k=-2")


def test_no_batches_is_an_error():
    with pytest.raises(ConfigError, match="at least one batch"):
        place(tiny_llama(0), [], "auto:plop")


def test_registration_rules():
    with pytest.raises(TypeError, match="must subclass"):
        register_placement("not_a_placement", help="x")(int)  # type: ignore[arg-type]

    class Nowhere(Placement):
        def choose(self, model, batches, *, seed=0, exclude=None):
            return ["no_such_module"]

    try:
        register_placement("nowhere_test", help="targets nothing")(Nowhere)
        register_placement("nowhere_test", help="targets nothing")(Nowhere)  # the same class again: fine
        with pytest.raises(ValueError, match="registered twice"):
            register_placement("nowhere_test", help="x")(type("Other", (Placement,), {}))
        with pytest.raises(TargetError, match="matched no module"):
            place(tiny_llama(0), batches(1), "auto:nowhere_test")
    finally:
        PLACEMENTS.pop("nowhere_test", None)
