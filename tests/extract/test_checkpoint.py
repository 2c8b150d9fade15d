"""The streaming checkpoint reader and safetensors writer."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lorakit.errors import CheckpointError
from lorakit.extract.checkpoint import Checkpoint
from lorakit.io.stream import SafetensorsWriter, header_room


def test_writer_output_reads_back_bit_exact_in_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randn(4, 1, generator=g)[:, :1].to(torch.float16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3).T,  # non-contiguous
        "e": torch.zeros(0, 4),
    }
    with SafetensorsWriter(tmp_path / "x.safetensors", header_room(len(tensors), 100)) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.close({"format": "pt", "note": "hi"})
    back = safetensors.torch.load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safetensors.safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    with pytest.raises(ValueError, match="exceeds the"), SafetensorsWriter(tmp_path / "y.safetensors", 64) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.close()
    ck = Checkpoint(tmp_path / "x.safetensors")
    for name, t in tensors.items():
        assert torch.equal(ck.get(name, None), t) and ck.shape(name) == tuple(t.shape)


def test_sharded_checkpoints_are_read_through_their_index(tmp_path):
    parts = {"model-1.safetensors": {"x.weight": torch.ones(2, 2)}, "model-2.safetensors": {"y.bias": torch.zeros(3)}}
    for file, state in parts.items():
        safetensors.torch.save_file(state, tmp_path / file)
    weight_map = {k: file for file, state in parts.items() for k in state}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = Checkpoint(tmp_path)
    assert sorted(ck.keys()) == ["x.weight", "y.bias"] and torch.equal(ck.get("x.weight"), torch.ones(2, 2))


def test_truncated_and_missing_files_get_clear_errors(tmp_path):
    safetensors.torch.save_file({"w": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"nonsense")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights \(found: pytorch_model\.bin\)"):
        Checkpoint(tmp_path)
