"""The collection format (collection.json + collection.safetensors): round trip, re-materialised factors, errors."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.io.collection import META_NAME, TENSORS_NAME, Collection, is_collection, write_collection

NAMES = ["alpha", "beta", "gamma"]
SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.down_proj": (128, 64)}  # (d_in, d_out)
R = 5


def tensors(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(d_out, R, generator=g), torch.randn(d_in, R, generator=g), torch.randn(3, R, R, generator=g))
        for m, (d_in, d_out) in SHAPES.items()
    }


def write(path, mods=None, **kw):
    args = dict(
        names=NAMES,
        rank=R,
        modules=mods or tensors(),
        kinds={m: "linear" for m in SHAPES},
        errors={n: 0.1 * i for i, n in enumerate(NAMES)},
        base_name="lorakit/tiny-llama",
        fingerprint={"model.layers.0.self_attn.q_proj": 3.5},
        task_type="CAUSAL_LM",
    )
    args.update(kw)
    return write_collection(path, **args)


def test_round_trip_and_rematerialised_factors(tmp_path):
    mods = tensors()
    path = write(tmp_path / "coll", mods)
    assert is_collection(path) and not is_collection(tmp_path) and not is_collection(tmp_path / "nope")
    coll = Collection.load(path)
    assert coll.names == NAMES and coll.rank == R and coll.base_name == "lorakit/tiny-llama"
    assert coll.fingerprint == {"model.layers.0.self_attn.q_proj": 3.5} and coll.task_type == "CAUSAL_LM"
    assert coll.errors == {"alpha": 0.0, "beta": 0.1, "gamma": 0.2}
    assert coll.target_modules == ["down_proj", "q_proj"]
    meta = json.loads((path / META_NAME).read_text())
    assert meta["format"] == "lorakit-collection" and meta["version"] == 1 and meta["adapters"] == NAMES
    assert meta["modules"]["model.layers.0.mlp.down_proj"] == {"kind": "linear", "d_in": 128, "d_out": 64}
    for m, (U, V, cores) in coll.modules().items():
        for got, want in zip((U, V, cores), mods[m], strict=True):
            assert torch.equal(got, want)
    assert coll.index("gamma") == 2
    f = coll.factors("beta")
    for m, (U, V, cores) in mods.items():
        assert f.factors[m].scale == 1.0 and f.kinds[m] == "linear"
        assert torch.equal(f.factors[m].A, V.T) and torch.equal(f.factors[m].B, U @ cores[1])
        torch.testing.assert_close(f.delta(m), U @ cores[1] @ V.T)  # ΔW_c = U·cores[c]·Vᵀ
    assert f.base_name == "lorakit/tiny-llama"


def test_unknown_name_lists_the_collection(tmp_path):
    coll = Collection.load(write(tmp_path / "coll"))
    with pytest.raises(ConfigError, match="no adapter named 'delta'.*alpha, beta, gamma"):
        coll.factors("delta")


def corrupt_json(path, **changes):
    meta = json.loads((path / META_NAME).read_text())
    meta.update(changes)
    (path / META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: (p / META_NAME).unlink(), "has no collection.json"),
        (lambda p: (p / META_NAME).write_text("{not json"), "is not valid JSON"),
        (lambda p: corrupt_json(p, format="peft"), "format is 'peft', expected 'lorakit-collection'"),
        (lambda p: corrupt_json(p, version=2), "version 2 is not supported"),
        (lambda p: corrupt_json(p, rank=0), "rank must be a positive integer"),
        (lambda p: corrupt_json(p, adapters=["a", "a", "b"]), "adapter names repeat"),
        (lambda p: corrupt_json(p, adapters=["a", "b"]), r"cores has shape \(3, 5, 5\) but .* implies \(2, 5, 5\)"),
        (lambda p: (p / TENSORS_NAME).unlink(), "collection.safetensors is missing"),
        (lambda p: (p / TENSORS_NAME).write_bytes((p / TENSORS_NAME).read_bytes()[:200]), "truncated or corrupt"),
    ],
)
def test_bad_collections_get_clear_errors(tmp_path, damage, message):
    path = write(tmp_path / "coll")
    damage(path)
    with pytest.raises(AdapterFormatError, match=message):
        Collection.load(path)


def test_tensor_mismatches_are_refused(tmp_path):
    mods = tensors()
    U, V, cores = mods["model.layers.0.self_attn.q_proj"]
    path = write(tmp_path / "coll", mods)
    flat = safetensors.torch.load_file(path / TENSORS_NAME)
    flat["model.layers.0.self_attn.q_proj.V"] = torch.randn(32, R)  # a d_in the json does not say
    safetensors.torch.save_file(flat, path / TENSORS_NAME)
    with pytest.raises(AdapterFormatError, match=r"q_proj.V has shape \(32, 5\) but .* implies \(64, 5\)"):
        Collection.load(path)
    flat["model.layers.0.self_attn.q_proj.V"] = V
    flat["extra.U"] = U
    safetensors.torch.save_file(flat, path / TENSORS_NAME)
    with pytest.raises(AdapterFormatError, match="does not match collection.json.*'extra.U'"):
        Collection.load(path)
    del flat["extra.U"]
    flat["model.layers.0.self_attn.q_proj.cores"] = cores.clone().index_fill_(0, torch.tensor([1]), float("nan"))
    safetensors.torch.save_file(flat, path / TENSORS_NAME)
    with pytest.raises(AdapterFormatError, match="q_proj.cores has NaN"):
        Collection.load(path)


def test_missing_dir_and_adapter_dir(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        Collection.load(tmp_path / "nope")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="an adapter dir, not a collection"):
        Collection.load(tmp_path / "adapter")


def test_writes_are_atomic_and_never_clobber_other_dirs(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(AdapterFormatError, match="refusing to overwrite"):
        write(other)
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    path = write(tmp_path / "coll")
    write(path, tensors(seed=1))  # an existing collection is replaced in one rename
    assert torch.equal(
        Collection.load(path).modules()["model.layers.0.self_attn.q_proj"][0],
        tensors(1)["model.layers.0.self_attn.q_proj"][0],
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
