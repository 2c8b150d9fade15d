"""Size is a property we check: method files ≤150 non-blank lines, every module ≤500."""

from pathlib import Path

import lorakit

SRC = Path(lorakit.__file__).parent


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def budget(path: Path) -> int:
    """Method files stay ≤150 non-blank lines (shared math goes into a _helper), every module ≤500."""
    in_methods = "methods" in path.parent.parts[-2:] and path.parent.name != "__pycache__"
    return 150 if in_methods and not path.name.startswith("_") else 500


def over_budget(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (non-blank lines, limit)} of every .py file under ``root`` over its budget."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        if _lines(path) > budget(path):
            found[str(path.relative_to(root))] = (_lines(path), budget(path))
    return found


def test_every_module_is_within_its_size_budget():
    assert over_budget(SRC) == {}, "files over their line budget: {path: (lines, limit)}"


def test_every_method_file_registers_and_names_its_paper():
    registered_files = {spec.adapter.__module__.rsplit(".", 1)[-1] for spec in lorakit.REGISTRY.values()}
    files = {p.stem for p in (SRC / "methods").rglob("*.py") if not p.name.startswith("_")}
    assert files <= registered_files, f"method files that register nothing: {files - registered_files}"
    for spec in lorakit.REGISTRY.values():
        doc = __import__(spec.adapter.__module__, fromlist=["x"]).__doc__ or ""
        assert spec.url in doc.splitlines()[0], f"{spec.name}: first docstring line must give the paper link"


TOY_METHOD = '''"""Toy output scaling (IA3-like, for the one-file test) — https://arxiv.org/abs/2205.05638
Update rule: h = (1 + l) ⊙ W₀x.
"""
from dataclasses import dataclass

import torch
from torch import nn

from lorakit import layers as L
from lorakit.methods._api import AdapterModule, register


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    pass


@register("toy_scale", config=ToyConfig, paper="toy", url="https://arxiv.org/abs/2205.05638", family="F7",
          params="d_out")
class ToyScale(AdapterModule):
    def __init__(self, d_out):
        super().__init__()
        self.config, self.l = ToyConfig(), nn.Parameter(torch.zeros(d_out))

    @classmethod
    def from_base(cls, base, cfg):
        return cls(L.dims(base)[1])

    def forward(self, x, base, y):
        return y * (1 + self.l)

    def delta_weight(self, base):
        return L.to_base_layout(base, self.l[:, None] * L.weight_out_in(base))

    def export_state(self):
        return {"toy_l": self.l}
'''


def test_a_new_method_is_one_file_and_nothing_else(tmp_path):
    """Dropping one file that registers itself is enough: listed, attachable, saved, loaded, merged."""
    import importlib.util

    import torch

    from lorakit.methods import REGISTRY
    from lorakit.testing import randomize_adapters, tiny_llama

    path = tmp_path / "toy_scale.py"
    path.write_text(TOY_METHOD)
    spec = importlib.util.spec_from_file_location("toy_scale", path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert "toy_scale" in lorakit.methods()
        model = tiny_llama()
        lorakit.attach(model, lorakit.method_config("toy_scale"), targets=["down_proj"])
        randomize_adapters(model, std=0.2)
        x = torch.randint(0, 256, (1, 6))
        y = model(x).logits
        saved = lorakit.save_adapter(model, tmp_path / "adapter")
        reloaded = lorakit.load_adapter(tiny_llama(), saved)
        torch.testing.assert_close(reloaded(x).logits, y)
        torch.testing.assert_close(lorakit.merge(model)(x).logits, y, atol=1e-5, rtol=1e-5)
    finally:
        REGISTRY.pop("toy_scale", None)
