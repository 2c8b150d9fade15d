"""The contract's required hooks: a method class that lacks one is refused when it registers, by name."""

from dataclasses import dataclass

import pytest
import torch

from lorakit.methods._api import REGISTRY, AdapterModule, register


@dataclass(frozen=True, kw_only=True)
class _Cfg:
    pass


def test_a_method_without_a_required_hook_is_refused_at_registration():
    class NoExport(AdapterModule):
        @classmethod
        def from_base(cls, base, cfg):
            return cls()

        def forward(self, x, base, y):
            return y

    with pytest.raises(TypeError, match="method 'no_export': NoExport must define the required hook.s. export_state"):
        register("no_export", config=_Cfg, paper="p", url="u", family="F2", params="0")(NoExport)
    assert "no_export" not in REGISTRY
    with pytest.raises(TypeError, match="abstract"):
        NoExport()  # ABCMeta refuses an instance too


def test_the_optional_hooks_default_to_doing_nothing():
    class Minimal(AdapterModule):
        @classmethod
        def from_base(cls, base, cfg):
            return cls()

        def forward(self, x, base, y):
            return y

        def export_state(self):
            return {}

    a = Minimal()
    assert a.fused_forward(torch.zeros(1), None) is None and a.delta_bias() is None and a.base_shift() is None
    assert a.init_factors() is None and a.export_shared() == {} and Minimal.config_from_peft({}) is None
