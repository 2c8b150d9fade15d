"""The serving engine against per-adapter references: each adapter merged alone into its own base copy."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.models.heads import contiguous_head
from lorakit.serve.engine import Engine
from lorakit.serve.requests import Request
from lorakit.testing import randomize_adapters, tiny_gpt2, tiny_llama

RANKS = {"a": 2, "b": 4, "c": 8, "d": 3}


def make_adapter(base, path, seed, method="lora", targets="all-linear", **opts):
    model = copy.deepcopy(base)
    lk.attach(model, lk.method_config(method, **opts), targets=targets)
    randomize_adapters(model, seed=seed, std=0.3)
    lk.save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny base, four LoRA adapters of mixed ranks (one on q/v only), and their merged references."""
    root = tmp_path_factory.mktemp("serve")
    base = tiny_llama(seed=3)
    dirs, refs = {}, {}
    for i, (name, r) in enumerate(RANKS.items()):
        targets = ["q_proj", "v_proj"] if name == "d" else "all-linear"
        dirs[name] = make_adapter(base, root / name, seed=10 + i, targets=targets, r=r, alpha=2.0 * r)
        ref = lk.load_adapter(copy.deepcopy(base), dirs[name])
        refs[name] = lk.merge(ref)
    refs[None] = base
    return base, dirs, refs


def engine_for(served, **kw):
    base, dirs, _ = served
    engine = Engine(copy.deepcopy(base), **kw)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    return engine


def greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    ids = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 256, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def test_forward_mixed_batch_equals_each_adapter_merged_alone(served):
    engine = engine_for(served)
    names = ["a", None, "c", "b", "a", "d", None, "c"]
    ids = torch.randint(0, 256, (len(names), 7), generator=torch.Generator().manual_seed(1))
    got = engine.forward(ids, names)
    for b, name in enumerate(names):
        with torch.no_grad():
            want = served[2][name](ids[b : b + 1]).logits[0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def test_the_head_reads_a_contiguous_input_with_the_same_logits(served):
    """transformers slices the last position, hidden[:, -1:, :], a strided view that torch's matmul runs
    as a slow expanded bmm; the engine's head gets a contiguous copy (models/heads.contiguous_head)."""
    engine = engine_for(served)
    seen: list[bool] = []
    engine.model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    names = ["a", None, "c"]
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(2))
    last = engine.forward(ids, names, keep=1)
    assert seen and all(seen)
    torch.testing.assert_close(last[:, -1], engine.forward(ids, names)[:, -1], rtol=1e-5, atol=1e-5)
    assert contiguous_head(engine.model) is engine.model  # a second call adds no second hook
    assert len(engine.model.get_output_embeddings()._forward_pre_hooks) == 2


def test_generate_mixed_batch_token_for_token(served):
    engine = engine_for(served)
    names = ["a", "b", None, "c", "d", "a", "c", None, "b", "d"]
    ps = prompts(len(names))
    outs = engine.generate(ps, names, max_new_tokens=12)
    for p, name, out in zip(ps, names, outs, strict=True):
        assert out.token_ids == greedy(served[2][name], p, 12), name
        assert out.finish_reason in ("stop", "length") and out.adapter == name


def test_requests_join_and_leave_between_steps(served):
    engine = engine_for(served, max_slots=2, max_batch=3)
    names = ["c", "a", None, "b", "d", "a", "c", "b"]
    ps = prompts(len(names), seed=5)
    lengths = [3, 9, 5, 12, 4, 7, 10, 6]
    reqs = []
    for i, (p, n, k) in enumerate(zip(ps, names, lengths, strict=True)):
        reqs.append(engine.submit(Request(p, n, max_new_tokens=k)))
        if i % 2:
            engine.step()
    while not all(r.done.is_set() for r in reqs):
        engine.step()
    for r, p, n, k in zip(reqs, ps, names, lengths, strict=True):
        assert r.out_ids == greedy(served[2][n], p, k), n
    assert engine.cache.stats.evictions > 0  # 4 adapters through 2 slots
    assert engine.cache.stats.loads >= 4


def test_other_methods_are_served_through_to_lora(served, tmp_path):
    base = served[0]
    path = make_adapter(base, tmp_path / "vera", seed=7, method="vera", r=4)
    engine = Engine(copy.deepcopy(base))
    engine.add_adapter("v", path)
    ref = lk.load_adapter(copy.deepcopy(base), path)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(engine.forward(ids, ["v", "v"]), want, rtol=1e-4, atol=1e-4)
    assert not any(type(m).__name__ == "AdaptedLayer" for m in engine.model.modules())  # conversion left nothing


def test_gpt2_conv1d_layers(tmp_path):
    base = tiny_gpt2(seed=1)
    path = make_adapter(base, tmp_path / "g", seed=4, r=4)
    engine = Engine(copy.deepcopy(base))
    engine.add_adapter("g", path)
    ref = lk.merge(lk.load_adapter(copy.deepcopy(base), path))
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(engine.forward(ids, ["g", None])[0], want[0], rtol=1e-4, atol=1e-4)


def test_remove_under_traffic_and_registry_persistence(served, tmp_path):
    base, dirs, refs = served
    engine = Engine(copy.deepcopy(base), state_dir=tmp_path / "state")
    for name in ("a", "b"):
        engine.add_adapter(name, dirs[name])
    p = prompts(1, seed=9)[0]
    running = engine.submit(Request(p, "a", max_new_tokens=6))
    engine.step()
    engine.remove_adapter("a")  # the running request keeps its weights to the end
    with pytest.raises(ConfigError, match="unknown adapter 'a'"):
        engine.submit(Request(p, "a"))
    while not running.done.is_set():
        engine.step()
    assert running.out_ids == greedy(refs["a"], p, 6)
    assert engine.cache.free  # its slot came back
    again = Engine(copy.deepcopy(base), state_dir=tmp_path / "state")
    assert again.adapters() == ["b"]


def test_preload_puts_adapters_in_slots_before_traffic(served):
    engine = engine_for(served, max_slots=3)
    engine.preload(["a", "b", "a", None])
    assert engine.cache.stats.loads == 2 and set(engine.cache.slot_of) == {"a", "b"}
    assert not engine.cache.pins  # nothing stays pinned
    assert not engine.cache.stats.requests  # and no request is counted
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2))
    got = engine.forward(ids, ["b", "a", "b"])
    assert engine.cache.stats.loads == 2  # the batch found them resident
    for b, name in enumerate(["b", "a", "b"]):
        with torch.no_grad():
            torch.testing.assert_close(got[b], served[2][name](ids[b : b + 1]).logits[0], rtol=1e-4, atol=1e-4)
    engine.preload(["c", "d", "a"])  # all three pinned together: none evicts another
    assert set(engine.cache.slot_of) == {"a", "c", "d"} and engine.cache.stats.loads == 4  # only c and d copied
    with pytest.raises(ConfigError, match="cannot preload 4 adapters into 3 slots"):
        engine.preload(["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        engine.preload(["nope"])
    assert not engine.cache.pins


def test_bad_adapters_get_clear_errors(served, tmp_path):
    base = served[0]
    engine = Engine(copy.deepcopy(base))
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ConfigError, match="not allowed"):
            engine.add_adapter(bad, served[1]["a"])
    saved = copy.deepcopy(base)
    lk.attach(saved, lk.method_config("lora", r=2), targets=["q_proj"], modules_to_save=["lm_head"])
    lk.save_adapter(saved, tmp_path / "mts")
    with pytest.raises(AdapterFormatError, match="replaces whole modules"):
        engine.add_adapter("mts", tmp_path / "mts")
    other = make_adapter(tiny_llama(seed=99), tmp_path / "other", seed=1, r=2)
    with pytest.raises(AdapterFormatError, match="different base"):
        engine.add_adapter("other", other)
    with pytest.raises(ConfigError, match="unknown adapter"):
        engine.generate([[5, 6, 7]], ["nope"])
    assert engine.adapters() == []


def test_sampling_is_seeded_and_stops_at_max_tokens(served):
    engine = engine_for(served)
    p = prompts(2, seed=3)
    one = engine.generate(p, ["a", "b"], max_new_tokens=8, temperature=0.8, seed=42)
    two = engine.generate(p, ["a", "b"], max_new_tokens=8, temperature=0.8, seed=42)
    assert [o.token_ids for o in one] == [o.token_ids for o in two]
    assert all(len(o.token_ids) <= 8 for o in one)


def test_compressed_collection_serves_its_rematerialised_adapters(served, tmp_path):
    """x·V once, the token's core, then ·Uᵀ: equal to each adapter rebuilt from the collection and merged."""
    from lorakit.compose.compress import compress
    from lorakit.io.collection import Collection
    from lorakit.io.factors import write_factors

    base, dirs, refs = served
    compress([dirs["a"], dirs["b"], dirs["c"]], tmp_path / "coll", rank=8, names=["ca", "cb", "cc"])
    engine = engine_for(served)
    assert engine.add_collection(tmp_path / "coll") == ["ca", "cb", "cc"]
    names = ["cb", "a", None, "ca", "cc", "cb"]
    ids = torch.randint(0, 256, (len(names), 6), generator=torch.Generator().manual_seed(4))
    got = engine.forward(ids, names)
    coll = Collection.load(tmp_path / "coll")
    for b, name in enumerate(names):
        if name is None or not name.startswith("c"):
            model = refs[name]
        else:
            write_factors(tmp_path / name, coll.factors(name))
            model = lk.merge(lk.load_adapter(copy.deepcopy(base), tmp_path / name))
        with torch.no_grad():
            want = model(ids[b : b + 1]).logits[0]
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)
    outs = engine.generate([[5, 6, 7], [8, 9]], ["cc", "ca"], max_new_tokens=5)
    assert all(len(o.token_ids) >= 1 and o.error is None for o in outs)
    with pytest.raises(ConfigError, match="already registered"):
        engine.add_collection(tmp_path / "coll")


def test_a_failing_step_fails_its_requests_and_frees_their_slots(served, monkeypatch):
    engine = engine_for(served)
    real = engine._run

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_run", broken)
    req = engine.submit(Request([5, 6, 7], "a", max_new_tokens=4))
    engine.step()
    assert req.done.is_set() and req.finish_reason == "error" and "boom" in (req.error or "")
    assert not engine.cache.pins and not engine.running
    monkeypatch.setattr(engine, "_run", real)  # the engine serves on afterwards
    assert engine.generate([[5, 6, 7]], ["a"], max_new_tokens=3)[0].error is None


def test_cancel_stops_waiting_and_running_requests(served):
    engine = engine_for(served)
    waiting = engine.submit(Request([5, 6, 7], "b", max_new_tokens=50))
    engine.cancel(waiting)
    running = engine.submit(Request([8, 9], "a", max_new_tokens=50))
    engine.step()
    engine.step()
    engine.cancel(running)
    engine.step()
    assert waiting.finish_reason == "cancelled" and waiting.out_ids == []
    assert running.finish_reason == "cancelled" and 1 <= len(running.out_ids) < 50
    assert not engine.running and not engine.cache.pins


def test_an_unseeded_sampling_request_leaves_torch_global_rng_alone():
    """Not torch.seed(): it reseeds every device's generator and formats a stack trace for each, which
    stalled the server's event loop (where requests are built) for 50-240 ms under load."""
    before = torch.get_rng_state()
    one, two = Request([5, 6], "a", temperature=0.8), Request([5, 6], "a", temperature=0.8)
    assert torch.equal(before, torch.get_rng_state())
    assert one.generator.initial_seed() != two.generator.initial_seed()


def test_submit_does_not_wait_for_an_adapter_being_bound(served, monkeypatch):
    """Binding may page an adapter in: the scheduler's lock is not held meanwhile, so submit (called on the
    server's event loop) returns at once."""
    import threading

    engine = engine_for(served)
    entered, release = threading.Event(), threading.Event()
    real = engine.bind

    def slow_bind(reqs):
        entered.set()
        assert release.wait(10)
        real(reqs)

    monkeypatch.setattr(engine, "bind", slow_bind)
    first = engine.submit(Request([5, 6, 7], "a", max_new_tokens=2))
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    assert entered.wait(10)
    second = threading.Thread(target=engine.submit, args=(Request([8, 9], "b", max_new_tokens=2),))
    second.start()
    second.join(5)
    submitted = not second.is_alive()
    release.set()
    stepper.join(10)
    assert submitted and first.out_ids
