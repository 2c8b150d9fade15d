"""The registry through restarts of a real server: unavailable adapters, remembered deletes, the scan's containment."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time

import httpx
import pytest
from typer.testing import CliRunner

from lorakit.serve import cache as cache_module
from lorakit.serve.engine import Engine
from lorakit.serve.server import register_adapter_dir
from tests.serve.test_server import PROMPT, TIMEOUT, World, serving

STATE = ".lorakit-serve"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("registry"))


def adapters_root(world, tmp_path, names=("a", "b")):
    """A fresh --adapters folder holding copies of the world's adapters ``names``."""
    root = tmp_path / "adapters"
    for name in names:
        shutil.copytree(world.root / name, root / name)
    return root


def start(world, root, **scan):
    """A (re)started server's engine: the registry restored from ``root``'s state dir, then the scan."""
    engine = Engine(copy.deepcopy(world.base), world.tok, state_dir=root / STATE)
    return engine, register_adapter_dir(engine, root, **scan)


def registry(root):
    return json.loads((root / STATE / "registry.json").read_text())


def complete(url, model):
    return httpx.post(
        f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4}, timeout=TIMEOUT
    )


def model_ids(url):
    return [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()["data"]]


def test_a_missing_folder_is_a_404_with_the_reason_until_it_is_back(world, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cache_module, "RETRY_S", 0.05)
    root = adapters_root(world, tmp_path)
    start(world, root)
    (root / "b").rename(tmp_path / "b-aside")
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        engine, (done, skipped) = start(world, root)
    assert done == ["a"] and not skipped and "adapter 'b' is unavailable" in caplog.text
    assert sorted(registry(root)["adapters"]) == ["a", "b"]
    with serving(engine, adapters_dir=root) as url:
        missing = complete(url, "b")
        error = missing.json()["error"]
        assert missing.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
        assert "'b' is unavailable" in error["message"] and "its folder b is missing" in error["message"]
        assert str(tmp_path) not in error["message"]  # no absolute server path
        assert model_ids(url) == [engine.base_name, "a"]
        (tmp_path / "b-aside").rename(root / "b")
        time.sleep(0.06)
        assert model_ids(url) == [engine.base_name, "a", "b"]  # GET /v1/models looks again
        assert complete(url, "b").status_code == 200
        (root / "a").rename(tmp_path / "a-aside")  # gone while served: served from RAM until the next start
        assert complete(url, "a").status_code == 200
    assert sorted(registry(root)["adapters"]) == ["a", "b"]


def test_a_request_naming_an_unavailable_adapter_looks_again(world, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "RETRY_S", 0.05)
    root = adapters_root(world, tmp_path, ["a"])
    engine, _ = start(world, root)
    shutil.copytree(world.root / "extra" / "new", root / "extra" / "new")
    engine.add_adapter("far", root / "extra" / "new")  # POSTed from a nested folder: the scan does not see it
    shutil.copytree(world.root / "a", root / "nested" / "x")
    engine.add_adapter("x", root / "nested" / "x")
    (root / "nested" / "x" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine, _ = start(world, root)
    with serving(engine, adapters_dir=root) as url:
        broken = complete(url, "x").json()["error"]["message"]
        assert "'x' is unavailable" in broken and "nested/x cannot be loaded" in broken and str(root) not in broken
        shutil.copy(world.root / "a" / "adapter_model.safetensors", root / "nested" / "x")
        time.sleep(0.06)
        assert complete(url, "x").status_code == 200  # the request itself brought it back
    assert engine.unavailable("far") is None and "far" in engine.adapters()


def test_deletes_survive_restarts_until_posted_again(world, tmp_path):
    root = adapters_root(world, tmp_path)
    engine, _ = start(world, root)
    with serving(engine, adapters_dir=root) as url:
        assert httpx.delete(f"{url}/v1/adapters/b", timeout=TIMEOUT).status_code == 200
    assert registry(root) == {"version": 2, "adapters": {"a": str(root.resolve() / "a")}, "removed": ["b"]}
    engine, (done, skipped) = start(world, root)
    assert done == ["a"] and "removed with DELETE" in skipped["b"] and engine.adapters() == ["a"]
    with serving(engine, adapters_dir=root) as url:
        assert complete(url, "b").status_code == 404
        posted = httpx.post(f"{url}/v1/adapters", json={"name": "b", "path": "b"}, timeout=TIMEOUT)
        assert posted.status_code == 200
    assert registry(root)["removed"] == []
    engine, (done, skipped) = start(world, root)
    assert done == ["a", "b"] and not skipped


def test_the_scan_keeps_links_out_of_the_adapters_dir_unless_allowed(world, tmp_path):
    root = adapters_root(world, tmp_path, ["a"])
    os.symlink(world.outside, root / "evil")
    engine, (done, skipped) = start(world, root)
    assert done == ["a"] and skipped["evil"].endswith(
        "is a link outside --adapters; start with --allow-any-path to serve it"
    )
    engine, (done, skipped) = start(world, root, allow_any_path=True)
    assert done == ["a", "evil"] and not skipped
    engine.add_adapter("far", world.outside)  # as POST /v1/adapters does under --allow-any-path
    engine, (done, skipped) = start(world, root)  # restarted without it: both stay registered, unavailable
    assert done == ["a"] and "link outside" in skipped["evil"] and engine.adapters() == ["a"]
    assert sorted(registry(root)["adapters"]) == ["a", "evil", "far"]
    with serving(engine, adapters_dir=root) as url:
        for name, shown in (("evil", "evil"), ("far", "evil")):
            error = complete(url, name).json()["error"]["message"]
            assert f"{shown} is outside --adapters; start with --allow-any-path to serve it" in error
            assert str(tmp_path) not in error and str(world.outside) not in error
    engine, (done, _) = start(world, root, allow_any_path=True)
    assert done == ["a", "evil"] and engine.adapters() == ["a", "evil", "far"]


def test_names_with_control_characters_are_refused(world, tmp_path):
    root = adapters_root(world, tmp_path, ["a"])
    engine, _ = start(world, root)
    with serving(engine, adapters_dir=root) as url:
        for name in ("a\n", "a\x00b", "a\tb", "new\n"):
            r = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": "a"}, timeout=TIMEOUT)
            assert r.status_code == 400 and r.json()["error"]["param"] == "name", name
    assert registry(root)["adapters"] == {"a": str(root.resolve() / "a")}


def test_cli_serve_stops_on_a_damaged_registry_with_one_line(world, tmp_path):
    from lorakit.cli import app

    ckpt, root = tmp_path / "tiny", adapters_root(world, tmp_path, ["a"])
    world.base.save_pretrained(ckpt)
    world.tok.save_pretrained(ckpt)
    file = root / STATE / "registry.json"
    file.parent.mkdir()
    file.write_text('{"a": "')
    result = CliRunner().invoke(app, ["serve", "--base", str(ckpt), "--adapters", str(root)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {file} is damaged (not JSON" in " ".join(result.output.split())
    assert f"mv {file} {file}.bad" in result.output.replace("\n", "")
