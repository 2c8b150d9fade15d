"""The adapter registry on its own (a cheap loader, no model): it never loses, resurrects or half-writes an entry."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.serve import cache as cache_module
from lorakit.serve.cache import AdapterCache, check_name
from lorakit.serve.slots import SlotBank

NAMES = [f"a{i}" for i in range(8)]


class Loader:
    """Loads an adapter dir as empty factors, counting the loads; a dir holding a file "broken" fails."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        if (path / "broken").exists():
            raise ValueError(f"{path / 'broken'}: the weights are damaged")
        return {}


def adapter_dirs(root, names=NAMES):
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "adapter_config.json").write_text("{}")
    return root


def new_cache(state, loader=None):
    return AdapterCache(SlotBank({}, 2, dtype=torch.float32), loader or Loader(), state)


def saved(state):
    return json.loads((state / "registry.json").read_text())


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(cache_module, "RETRY_S", 0.05)
    return 0.06


def test_a_missing_folder_stays_registered_as_unavailable_and_comes_back(tmp_path, caplog, fast_retry):
    root, state = adapter_dirs(tmp_path / "adapters", ["a", "b"]), tmp_path / "state"
    first = new_cache(state)
    for name in ("a", "b"):
        first.register(name, root / name)
    (root / "b").rename(tmp_path / "b-aside")
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        cache = new_cache(state)
        assert cache.restore() == ["b"]
    assert [r.name for r in caplog.records] == ["lorakit.serve"] and "'b' is unavailable" in caplog.text
    assert "missing" in caplog.text and str(root / "b") in caplog.text
    assert cache.names() == ["a"] and "b" not in cache and cache.path_of("b") == str(root / "b")
    assert "missing" in cache.reason("b") and cache.reason("a") is None and cache.reason("nope") is None
    cache.register("c", root / "a")  # a write keeps the unavailable entry
    assert saved(state)["adapters"] == {"a": str(root / "a"), "b": str(root / "b"), "c": str(root / "a")}
    assert not cache.revive("b")  # still missing
    (tmp_path / "b-aside").rename(root / "b")
    assert not cache.revive("b")  # looked at less than RETRY_S ago
    time.sleep(fast_retry)
    assert cache.revive("b") and cache.names() == ["a", "b", "c"] and cache.reason("b") is None
    assert cache.acquire("b") >= 0


def test_a_failing_load_is_retried_only_when_its_files_change(tmp_path, fast_retry):
    root, state = adapter_dirs(tmp_path / "adapters", ["a"]), tmp_path / "state"
    new_cache(state).register("a", root / "a")
    (root / "a" / "broken").write_text("x")
    loader = Loader()
    cache = new_cache(state, loader)
    assert cache.restore() == ["a"] and loader.calls == 1
    assert "cannot be loaded" in cache.reason("a") and "the weights are damaged" in cache.reason("a")
    for _ in range(3):
        time.sleep(fast_retry)
        assert not cache.revive("a")
    assert loader.calls == 1  # unchanged files are not loaded again
    (root / "a" / "broken").unlink()
    time.sleep(fast_retry)
    assert cache.revive("a") and loader.calls == 2
    assert saved(state)["adapters"] == {"a": str(root / "a")}


def test_an_unavailable_adapter_can_be_deleted_and_registered_again(tmp_path):
    root, state = adapter_dirs(tmp_path / "adapters", ["a"]), tmp_path / "state"
    new_cache(state).register("a", tmp_path / "gone")
    cache = new_cache(state)
    assert cache.restore() == ["a"]
    cache.register("a", root / "a")  # re-pointed
    assert cache.names() == ["a"] and cache.reason("a") is None
    cache.refuse("a", "not here")
    assert cache.reason("a") == "not here" and not cache.revive("a")  # refused for good: not retried
    cache.unregister("a")
    assert cache.path_of("a") is None and saved(state)["adapters"] == {}
    with pytest.raises(KeyError):
        cache.unregister("a")


def test_deletes_of_scanned_names_are_remembered_until_registered_again(tmp_path):
    root, state = adapter_dirs(tmp_path / "adapters", ["a", "b"]), tmp_path / "state"
    cache = new_cache(state)
    cache.scan_root = root
    for name in ("a", "b"):
        cache.register(name, root / name)
    cache.register("other", root / "a")
    for name in ("a", "other"):
        cache.unregister(name)
    assert saved(state) == {"version": 2, "adapters": {"b": str(root / "b")}, "removed": ["a"]}  # no folder "other"
    again = new_cache(state)
    again.restore()
    assert again.removed == {"a"} and again.names() == ["b"]
    again.register("a", root / "b")
    assert saved(state)["removed"] == []


def test_the_first_format_is_still_read_and_written_as_version_2(tmp_path):
    root, state = adapter_dirs(tmp_path / "adapters", ["a", "version"]), tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_text(json.dumps({"a": str(root / "a"), "version": str(root / "version")}))
    cache = new_cache(state)
    assert cache.restore() == [] and cache.names() == ["a", "version"]
    cache.unregister("version")
    assert saved(state) == {"version": 2, "adapters": {"a": str(root / "a")}, "removed": []}


DAMAGED = [
    b"",
    b'{"a": "/x"',
    b"[1, 2]",
    b'"a"',
    b"\xff\xfe",
    b'{"a": 5}',
    b'{"a": ""}',
    b'{"version": 2, "adapters": []}',
    b'{"version": 2, "adapters": {"a": 5}}',
    b'{"version": 2, "adapters": {}, "removed": "a"}',
    b'{"version": 2, "adapters": {}, "removed": [1]}',
    b'{"version": 2, "adapters": {}, "extra": 1}',
    b'{"version": 3, "adapters": {}}',
    b'{"a\\n": "/x"}',
    b'{"version": 2, "adapters": {"../x": "/x"}}',
]


@pytest.mark.parametrize("content", DAMAGED)
def test_a_damaged_registry_is_one_clear_error_and_left_as_it_is(tmp_path, content):
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.json").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        new_cache(state).restore()
    message = str(info.value)
    assert message.startswith(f"{state / 'registry.json'} is damaged (") and "\n" not in message
    assert f"mv {state / 'registry.json'} {state / 'registry.json'}.bad" in message and "restore it" in message
    assert (state / "registry.json").read_bytes() == content


@pytest.mark.parametrize("name", ["a\n", "a\x00b", "a\tb", "a\r", "\na", "a b", "a/b", "..", "a..b", "", "x" * 129])
def test_names_are_checked_whole(tmp_path, name):
    with pytest.raises(ConfigError, match="is not allowed"):
        check_name(name)
    cache = new_cache(tmp_path / "state")
    with pytest.raises(ConfigError, match="is not allowed"):
        cache.register(name, tmp_path)
    assert not (tmp_path / "state" / "registry.json").exists()


def _churn(state, root, seed, fd):
    """The child: register and unregister adapters at random, reporting "?name" before and "+name"/"-name"
    after each call returns, until it is killed."""
    cache = new_cache(state)
    cache.restore()
    rng = random.Random(seed)
    while True:
        name = rng.choice(NAMES)
        os.write(fd, f"?{name}\n".encode())
        if cache.path_of(name) is None:
            cache.register(name, root / name)
            os.write(fd, f"+{name}\n".encode())
        else:
            cache.unregister(name)
            os.write(fd, f"-{name}\n".encode())


def _killed_churn(state, root, seed, after):
    """Run :func:`_churn` in a forked child, ``kill -9`` it ``after`` seconds later; returns its report."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            _churn(state, root, seed, write)
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            os.write(write, f"!{e!r}\n".encode())
        os._exit(1)
    os.close(write)
    time.sleep(after)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return f.read().splitlines()


def test_kill_9_during_registry_writes_never_loses_an_entry_or_leaves_a_temp_file(tmp_path):
    root, state = adapter_dirs(tmp_path / "adapters"), tmp_path / "state"
    rng = random.Random(0)
    want: dict[str, bool] = {}  # name -> registered, as of the last call that returned
    for i in range(20):
        report = _killed_churn(state, root, seed=i, after=rng.uniform(0.005, 0.08))
        assert not [line for line in report if line.startswith("!")], report
        in_flight = {line[1:] for line in report[-1:] if line.startswith("?")}  # its write may or may not be done
        for line in report:
            if line[0] in "+-":
                want[line[1:]] = line[0] == "+"
        cache = new_cache(state)
        cache.restore()  # the restart: a valid registry (no ConfigError) and no temp file left
        assert not list(state.glob(".registry.json.tmp-*")) and not cache.unavailable
        got = cache.entries()
        for name in in_flight:
            want[name] = name in got
        assert {n for n, registered in want.items() if registered} == set(got), i
