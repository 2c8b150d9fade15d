"""The fast extraction path: lazy imports, the read/write threads, mapped reads and the plot helper.

Each speed measure keeps a property checked here: the CLI verbs and ``lk.*`` names still resolve
to the real functions; what extraction restates to avoid heavy imports equals its original; the
threads keep order, bound their queues and hand errors back unchanged; a failed or interrupted
run leaves no directory and no thread behind; the helper process draws the same PNG.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli import VERBS, app, build_app, verb_function
from lorakit.extract import extract
from lorakit.extract.checkpoint import Checkpoint
from lorakit.extract.pipeline import BackgroundWriter, Prefetch
from lorakit.extract.report import PlotJob, curves, draw, largest
from lorakit.io.stream import SafetensorsWriter, header_room
from lorakit.testing import save_tuned_pair, tiny_llama

HEAVY = ("transformers", "lorakit.inject", "lorakit.methods", "lorakit.io.adapter", "lorakit.io.factors", "matplotlib")


def _python(code: str, tmp_path) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(autouse=True)
def watchdog():
    """A hang in a thread handshake fails the run with every thread's stack instead of stalling it."""
    import faulthandler

    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def pair(tmp_path):
    return save_tuned_pair(tmp_path, tiny_llama, seed=3)


def test_lorakit_names_load_on_first_use(tmp_path):
    loaded = json.loads(_python("import json, sys, lorakit; print(json.dumps(sorted(sys.modules)))", tmp_path))
    assert [m for m in loaded if m.startswith("lorakit")] == ["lorakit", "lorakit.errors"] and "torch" not in loaded
    import lorakit.inject
    import lorakit.io.adapter

    assert lk.attach is lorakit.inject.attach and lk.save_adapter is lorakit.io.adapter.save_adapter
    assert "lora" in lk.methods() and lk.methods() == sorted(lk.REGISTRY)
    assert set(lk.__all__) <= set(dir(lk))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = lk.nope


def test_the_extract_cli_loads_no_method_code_transformers_or_matplotlib(pair, tmp_path):
    base, tuned = pair
    code = (
        "import json, sys; from lorakit.cli import main\n"
        f"sys.argv = ['lorakit', 'extract', '--base', {str(base)!r}, '--tuned', {str(tuned)!r}, '--out', 'out']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    loaded = json.loads(_python(code, tmp_path).strip().splitlines()[-1])
    assert not [m for m in loaded if m.startswith(HEAVY)]
    assert (tmp_path / "out" / "extract_energy.png").read_bytes()[:4] == b"\x89PNG"  # drawn by the helper


def test_the_lazy_cli_shows_what_the_eager_app_shows_for_every_verb(tmp_path):
    """`lorakit` (main) builds stand-ins that import a verb only when used; their help is the functions'."""
    assert [c.name for c in app.registered_commands] == list(VERBS)
    assert all(c.callback is verb_function(c.name) for c in app.registered_commands)
    loaded = _python(
        "import sys; from lorakit.cli import main; sys.argv = ['lorakit', 'extract', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('lorakit.cli.')), 'torch' in sys.modules)",
        tmp_path,
    )
    assert loaded.strip().splitlines()[-1] == "['lorakit.cli._common', 'lorakit.cli.extract'] False"
    lazy = build_app(lazy=True)
    for args in [[verb, "--help"] for verb in VERBS] + [["--help"], ["extract"], ["nope"]]:
        ours, theirs = CliRunner().invoke(lazy, args), CliRunner().invoke(app, args)
        assert (ours.exit_code, ours.output) == (theirs.exit_code, theirs.output), args


def test_prefetch_keeps_order_bounds_its_lookahead_and_reraises_the_same_error():
    produced: list[int] = []
    boom = ValueError("item 5 is broken")

    def items():
        for i in range(8):
            if i == 5:
                raise boom
            produced.append(i)
            yield i

    got = []
    with pytest.raises(ValueError) as caught, Prefetch(items(), ahead=1) as it:
        for x in it:
            threading.Event().wait(0.01)  # let the reader run as far ahead as it may
            assert len(produced) - len(got) <= 3  # the item in hand, one queued, one waiting to be queued
            got.append(x)
    assert caught.value is boom and got == [0, 1, 2, 3, 4]
    before = threading.active_count()
    with Prefetch(iter(range(100)), ahead=1) as it:
        assert next(it) == 0  # leave early: the reader stops and is joined
    assert threading.active_count() <= before and produced


def test_background_writer_writes_in_order_within_its_byte_limit(tmp_path):
    tensors = {f"t{i}": torch.full((i + 1, 16), float(i)) for i in range(12)}  # 64 .. 768 bytes
    with SafetensorsWriter(tmp_path / "direct.safetensors", header_room(12, 0)) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.close()
    with SafetensorsWriter(tmp_path / "queued.safetensors", header_room(12, 0)) as w:
        with BackgroundWriter(w, limit=1000) as bg:  # full long before WAKE bytes: add() must wake the writer
            for name, t in tensors.items():
                bg.add(name, t)
                assert bg.queued <= max(1000, t.numel() * 4)
        w.close()
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "queued.safetensors").read_bytes()
    with (
        pytest.raises(KeyError) as caught,
        SafetensorsWriter(tmp_path / "bad.safetensors", 512) as w,
        BackgroundWriter(w) as bg,
    ):
        bg.add("c", torch.zeros(2, dtype=torch.complex64))  # no safetensors name: fails in the thread
    assert caught.value.args == (torch.complex64,) and not bg.thread.is_alive()


def test_a_failed_write_leaves_no_adapter_dir_and_no_thread(pair, tmp_path, monkeypatch):
    base, tuned = pair
    real, calls = SafetensorsWriter.add, {"n": 0}

    def disk_full(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "add", disk_full)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(OSError, match="No space left"):
        extract(base, tuned, tmp_path / "out", rank=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned"]
    assert {t.name for t in threading.enumerate()} <= before


def test_checkpoint_tensors_are_private_mappings_or_copies(pair, monkeypatch):
    import mmap

    import safetensors.torch

    base, _ = pair
    ck = Checkpoint(base)
    stored = safetensors.torch.load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    first = ck.get(key, None)
    first.add_(1.0)  # copy-on-write: neither the file nor the next read sees it
    assert torch.equal(ck.get(key, None), stored[key]) and torch.equal(Checkpoint(base).get(key, None), stored[key])

    def no_mapping(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(mmap, "mmap", no_mapping)  # mapping fails: the bytes are read instead
    assert all(torch.equal(ck.get(k, None), v) for k, v in stored.items())


def test_the_helper_process_draws_the_same_png_and_reports_failures(pair, tmp_path, monkeypatch):
    base, tuned = pair
    result = extract(base, tuned, tmp_path / "a", rank=2, progress=False, plot=False)
    draw(curves(result), tmp_path / "here.png")
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)  # as in a fresh CLI process
    early = type(result)(result.path, modules=dict(result.modules), spectra={})
    with PlotJob(True, tmp_path / "helper.png") as job:
        assert job.proc is not None
        for module, spectrum in result.spectra.items():  # as the modules are factored: jobs go out early
            early.spectra[module] = spectrum
            job.update(early)
        job.finish(result)
        job.wait()
    assert job.sent == largest(result)
    assert (tmp_path / "helper.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    with (
        pytest.raises(RuntimeError, match="drawing .*missing.*failed"),
        PlotJob(True, tmp_path / "missing" / "x.png") as job,
    ):
        job.finish(result)
        job.wait()
    with pytest.raises(KeyboardInterrupt), PlotJob(True, tmp_path / "never.png") as job:
        raise KeyboardInterrupt
    assert job.proc is not None and job.proc.returncode is not None  # stopped, not left running
