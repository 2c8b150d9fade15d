"""The HTTP server against a real uvicorn on loopback: the OpenAI client and httpx against engine.generate."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import string
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import lorakit as lk
from lorakit.compose.compress import compress
from lorakit.serve.engine import Engine
from lorakit.serve.server import create_app, register_adapter_dir
from lorakit.testing import randomize_adapters, tiny_llama

TIMEOUT = 60
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPT = "Hello, tiny world"
JSON = {"Content-Type": "application/json"}


def char_tokenizer():
    """A real fast tokenizer over the tiny model's 256 ids: <unk> <s> </s>, printable ASCII, then filler tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, chars = ["<unk>", "<s>", "</s>"], [*string.printable[:95], "\n"]
    fill = [f"<t{i}>" for i in range(256 - len(specials) - len(chars))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars + fill)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def save_adapter(base, path, seed, r, targets="all-linear"):
    model = lk.attach(copy.deepcopy(base), lk.method_config("lora", r=r, alpha=2.0 * r), targets=targets)
    randomize_adapters(model, seed=seed, std=0.3)
    return lk.save_adapter(model, path)


@contextlib.contextmanager
def serving(engine, **options):
    """A real uvicorn server for ``create_app(engine, **options)`` on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive()


class World:
    """A tiny base, its tokenizer, an adapters dir with a (r=2), b (r=4), c (r=8, q/v only), and more outside it."""

    def __init__(self, root):
        self.base, self.tok = tiny_llama(seed=3), char_tokenizer()
        self.root = root / "adapters"
        for i, (name, r) in enumerate({"a": 2, "b": 4, "c": 8}.items()):
            save_adapter(self.base, self.root / name, 10 + i, r, ["q_proj", "v_proj"] if name == "c" else "all-linear")
        save_adapter(self.base, self.root / "extra" / "new", 20, 4)  # nested: not registered at start
        self.outside = save_adapter(self.base, root / "outside" / "evil", 21, 4)

    def engine(self, **kw):
        engine = Engine(copy.deepcopy(self.base), self.tok, **kw)
        register_adapter_dir(engine, self.root)
        return engine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def live(world):
    """The main server: slots for 2 of the 3 adapters, a 64-token prompt limit, the registry under the dir."""
    engine = world.engine(max_slots=2, state_dir=world.root / ".lorakit-serve")
    with serving(engine, adapters_dir=world.root, max_prompt_tokens=64) as url:
        yield engine, url


def client(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def metric_values(url, **headers):
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=TIMEOUT).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_models_lists_the_base_and_every_adapter_dir(live):
    engine, url = live
    ids = [m.id for m in client(url).models.list().data]
    assert ids == [engine.base_name, "a", "b", "c"]  # extra/new is nested, so not registered at start


@pytest.mark.parametrize("model", ["a", "b", "c", "base", None])
def test_completions_equal_engine_generate(live, model):
    engine, url = live
    adapter = None if model == "base" else model
    want = engine.generate([PROMPT], [adapter], max_new_tokens=10)[0]
    got = client(url).completions.create(model=model or "", prompt=PROMPT, max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(PROMPT) and got.usage.completion_tokens == len(want.token_ids)
    assert got.model == (model or engine.base_name)
    ids = engine.encode(PROMPT)
    by_ids = client(url).completions.create(model=model or "base", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == want.text


def test_adapters_change_the_answer(live):
    engine, url = live
    texts = {
        m: client(url).completions.create(model=m, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
        for m in ("a", "b", "c", "base")
    }
    assert len(set(texts.values())) == 4, texts


def test_chat_uses_the_chat_template(live, world):
    engine, url = live
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    text = world.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    ids = world.tok(text, add_special_tokens=False)["input_ids"]
    want = engine.generate([ids], ["b"], max_new_tokens=9)[0]
    got = client(url).chat.completions.create(model="b", messages=turns, max_tokens=9, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids) == len(text)


def test_streams_join_to_the_full_answer(live):
    _, url = live
    full = client(url).completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0).choices[0]
    chunks = list(client(url).completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert chunks[-1].choices[0].finish_reason == full.finish_reason and len(chunks) > 2
    turns = [{"role": "user", "content": "hi"}]
    whole = client(url).chat.completions.create(model="c", messages=turns, max_tokens=8, temperature=0)
    parts = list(
        client(url).chat.completions.create(model="c", messages=turns, max_tokens=8, temperature=0, stream=True)
    )
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content


def test_a_list_of_prompts_and_n_choices_each(live):
    engine, url = live
    prompts = [PROMPT, "Other words", engine.encode("ids too")]
    want = engine.generate(prompts, ["b"] * 3, max_new_tokens=7)
    got = client(url).completions.create(model="b", prompt=prompts, n=2, max_tokens=7, temperature=0)
    assert [c.index for c in got.choices] == list(range(6))  # prompt p's choice j at p·n + j, as OpenAI's
    assert [(c.text, c.finish_reason) for c in got.choices] == [(w.text, w.finish_reason) for w in want for _ in "jj"]
    assert got.usage.prompt_tokens == sum(len(engine.encode(p)) if isinstance(p, str) else len(p) for p in prompts)
    assert got.usage.completion_tokens == 2 * sum(len(w.token_ids) for w in want)
    stream = client(url).completions.create(model="b", prompt=prompts, n=2, max_tokens=7, temperature=0, stream=True)
    texts, finished = [""] * 6, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert texts == [c.text for c in got.choices] and finished == {c.index: c.finish_reason for c in got.choices}
    turns = [{"role": "user", "content": "hi"}]
    chat = client(url).chat.completions.create(model="c", messages=turns, n=3, max_tokens=5, temperature=0)
    one = client(url).chat.completions.create(model="c", messages=turns, max_tokens=5, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert {c.message.content for c in chat.choices} == {one.choices[0].message.content}


def test_raw_sse_ends_with_done_and_can_carry_usage(live):
    _, url = live
    body = {
        "model": "b",
        "prompt": PROMPT,
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)


def test_stop_strings(live):
    engine, url = live
    full = engine.generate([PROMPT], ["a"], max_new_tokens=20)[0].text
    assert len(full) >= 8, full
    stop = full[4:6]
    cut = full[: full.find(stop)]
    want = engine.generate([PROMPT], ["a"], max_new_tokens=20, stop=[stop])[0]
    assert want.text == cut and want.finish_reason == "stop"
    got = client(url).completions.create(model="a", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "@@"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = client(url).completions.create(
        model="a", prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_post_and_delete_adapters(live, world):
    engine, url = live
    registry = world.root / ".lorakit-serve" / "registry.json"
    r = httpx.post(f"{url}/v1/adapters", json={"name": "new", "path": "extra/new"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["id"] == "new"
    assert (
        "new" in [m.id for m in client(url).models.list().data]
        and "new" in json.loads(registry.read_text())["adapters"]
    )
    want = engine.generate([PROMPT], ["new"], max_new_tokens=8)[0].text
    assert (
        client(url).completions.create(model="new", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text == want
    )
    again = httpx.post(f"{url}/v1/adapters", json={"name": "new", "path": "a"}, timeout=TIMEOUT)
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    assert httpx.post(f"{url}/v1/adapters", json={"name": "base", "path": "a"}, timeout=TIMEOUT).status_code == 409
    gone = httpx.delete(f"{url}/v1/adapters/new", timeout=TIMEOUT)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert "new" not in engine.adapters() and "new" not in json.loads(registry.read_text())["adapters"]
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="new", prompt=PROMPT, max_tokens=2)
    missing = httpx.delete(f"{url}/v1/adapters/new", timeout=TIMEOUT)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_adapter_paths_cannot_leave_the_adapters_dir(live, world, tmp_path):
    engine, url = live
    link = world.root / "link"
    if not link.exists():
        os.symlink(world.outside, link)
    for path in ["../outside/evil", str(world.outside), "link", "extra/../../outside/evil"]:
        r = httpx.post(f"{url}/v1/adapters", json={"name": "evil", "path": path}, timeout=TIMEOUT)
        assert r.status_code == 403, path
        assert r.json()["error"]["param"] == "path" and "--allow-any-path" in r.json()["error"]["message"]
    for name in ["../x", "a/b", ".hidden", "", 7]:
        r = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": "extra/new"}, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name", name
    for path in ["nope", "extra", None]:
        r = httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": path}, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", path
    assert engine.adapters() == ["a", "b", "c"]


BAD = [  # (endpoint, body, the field the error names)
    ("completions", b"{not json", None),
    ("completions", b"[1, 2]", None),
    ("completions", {"prompt": PROMPT, "n": 0}, "n"),
    ("completions", {"prompt": PROMPT, "n": 65}, "n"),
    ("completions", {"prompt": [PROMPT] * 9, "n": 8}, "n"),  # 72 completions, over MAX_CHOICES
    ("completions", {"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("completions", {"prompt": PROMPT, "top_p": 0}, "top_p"),
    ("completions", {"prompt": PROMPT, "stop": 5}, "stop"),
    ("completions", {"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("completions", {"prompt": PROMPT, "stream": "yes"}, "stream"),
    ("completions", {"prompt": PROMPT, "seed": 1.5}, "seed"),
    ("completions", {"prompt": PROMPT, "logprobs": 3}, "logprobs"),
    ("completions", {"prompt": PROMPT, "model": 3}, "model"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": ["one", 5]}, "prompt"),
    ("completions", {"prompt": ["one", ""]}, "prompt[1]"),
    ("completions", {"prompt": ["one", [1, 999]]}, "prompt[1]"),
    ("completions", {"prompt": [PROMPT] * 65}, "prompt"),
    ("completions", {"prompt": [1, 999]}, "prompt"),
    ("completions", {"prompt": "x" * 65}, "prompt"),  # over --max-prompt-tokens 64
    ("completions", {"prompt": "x" * 60, "max_tokens": 200}, "max_tokens"),  # past the model's 256 positions
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
        "max_completion_tokens",
    ),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), BAD)
def test_bad_requests_are_400s_that_name_the_field(live, endpoint, body, param):
    _, url = live
    kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/{endpoint}", timeout=TIMEOUT, **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_unknown_models_are_404s_that_say_how_to_list(live):
    _, url = live
    with pytest.raises(openai.NotFoundError) as info:
        client(url).completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "/v1/models" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT).json()["error"]["message"] == "Not Found"


def test_api_key(world):
    engine = world.engine()
    with serving(engine, api_key="sekret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for method, path in (
                ("POST", "/v1/completions"),
                ("GET", "/v1/models"),
                ("GET", "/metrics"),
                ("POST", "/v1/adapters"),
                ("DELETE", "/v1/adapters/a"),
            ):
                r = httpx.request(method, url + path, headers=headers, json={"prompt": "x"}, timeout=TIMEOUT)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, path)
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "sekret").completions.create(model="a", prompt=PROMPT, max_tokens=3).usage.total_tokens > 0
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200  # probes need no key
        assert (
            metric_values(url, Authorization="Bearer sekret")[
                ("lorakit_requests_total", (("adapter", "a"), ("status", "200")))
            ]
            == 1
        )


def test_a_full_queue_is_429_and_waiting_requests_still_finish(world):
    """--max-queue counts the requests waiting beyond what the running batch can take (max_batch 1 here)."""
    engine = world.engine(max_batch=1)
    with serving(engine, max_queue=1) as url:
        engine.stop()  # pause the scheduler: requests wait in the queue
        waiting: dict = {}
        body = {"model": "b", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}

        def send(key):
            waiting[key] = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]  # one for the batch, one waits
        for thread in threads:
            thread.start()
            deadline = time.monotonic() + TIMEOUT
            while engine.queue_depth() < threads.index(thread) + 1:  # both wait: the scheduler is paused
                assert time.monotonic() < deadline
                time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as info:
            client(url).completions.create(model="a", prompt=PROMPT, max_tokens=2)
        assert info.value.body["code"] == "queue_full" and "--max-queue 1" in info.value.body["message"]
        three = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "n": 3}, timeout=TIMEOUT)
        assert three.status_code == 400 and "at most 2 at once" in three.json()["error"]["message"]
        engine.start()
        for thread in threads:
            thread.join(TIMEOUT)
        want = engine.generate([PROMPT], ["b"], 6)[0].text
        assert [waiting[k].status_code for k in range(2)] == [200, 200]
        assert all(waiting[k].json()["choices"][0]["text"] == want for k in range(2))
        values = metric_values(url)
        assert values[("lorakit_requests_total", (("adapter", "a"), ("status", "429")))] == 1
        assert values[("lorakit_requests_total", (("adapter", "b"), ("status", "200")))] == 2


def test_a_failed_generation_is_a_500_with_the_engines_message(world, monkeypatch):
    engine = world.engine()
    with serving(engine) as url:

        def broken_decode():
            raise RuntimeError("decode exploded")

        monkeypatch.setattr(engine.scheduler, "_decode", broken_decode)  # prefill works, the first decode step fails
        with pytest.raises(openai.InternalServerError) as info:
            client(url).completions.create(model="a", prompt=PROMPT, max_tokens=4, temperature=0)  # no EOS at prefill
        assert "decode exploded" in info.value.body["message"] and info.value.body["type"] == "server_error"
        body = {"model": "a", "prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = [line for line in r.iter_lines() if line]
        assert "decode exploded" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
        monkeypatch.undo()
        ok = client(url).completions.create(model="a", prompt=PROMPT, max_tokens=4, temperature=0)
        assert ok.choices[0].text == engine.generate([PROMPT], ["a"], 4)[0].text  # the server carried on


def test_metrics_count_requests_tokens_and_slots(live):
    engine, url = live
    before = metric_values(url)
    made = [client(url).completions.create(model=m, prompt=PROMPT, max_tokens=5, temperature=0) for m in "abca"]
    httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=TIMEOUT)
    httpx.post(f"{url}/v1/completions", content=b"{", headers=JSON, timeout=TIMEOUT)
    after = metric_values(url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert delta("lorakit_requests_total", adapter="a", status="200") == 2
    assert delta("lorakit_requests_total", adapter="c", status="200") == 1
    assert delta("lorakit_requests_total", adapter="unknown", status="404") == 1
    assert delta("lorakit_requests_total", adapter="invalid", status="400") == 1
    assert delta("lorakit_request_latency_seconds_count") == 4
    assert delta("lorakit_generated_tokens_total") == sum(m.usage.completion_tokens for m in made)
    stats = engine.cache.stats
    assert after[("lorakit_slot_loads_total", ())] == stats.loads and stats.loads > 0
    assert after[("lorakit_slot_evictions_total", ())] == stats.evictions and delta("lorakit_slot_evictions_total") >= 2
    resident = {dict(k[1])["adapter"]: v for k, v in after.items() if k[0] == "lorakit_slot_resident"}
    assert resident == {n: 1 for n in engine.cache.slot_of} and set(resident) == {"c", "a"}  # 2 slots, LRU
    assert after[("lorakit_slots", ())] == 2 and after[("lorakit_queue_depth", ())] == 0
    ram = sum(a.nbytes + b.nbytes for f in engine.cache.factors.values() for a, b in f.values())
    assert after[("lorakit_adapter_bytes", (("where", "ram"),))] == ram
    in_slots = sum(engine.bank.nbytes(s) for s in engine.cache.slot_of.values())
    assert after[("lorakit_adapter_bytes", (("where", "slots"),))] == in_slots > 0


def test_cli_serve_registers_the_adapter_dirs(world, tmp_path, monkeypatch):
    from lorakit.cli import app
    from lorakit.serve import server

    ckpt, root = tmp_path / "tiny", tmp_path / "adapters"
    world.base.save_pretrained(ckpt)
    world.tok.save_pretrained(ckpt)
    for name in "abc":
        shutil.copytree(world.root / name, root / name)
    (root / "bad name").mkdir()
    (root / "bad name" / "adapter_config.json").write_text((root / "a" / "adapter_config.json").read_text())
    compress([world.root / "a", world.root / "b"], tmp_path / "coll", rank=8, names=["ca", "cb"])
    seen = {}

    def fake_run(app_, *, host, port, log_level):  # instead of uvicorn: ask the app in-process, then return
        from starlette.testclient import TestClient

        with TestClient(app_) as http:
            seen.update(host=host, port=port, models=[m["id"] for m in http.get("/v1/models").json()["data"]])
            seen["resident"] = sorted(app_.state.server.engine.cache.slot_of)
            body = {"model": "cb", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            seen["text"] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
            seen["want"] = app_.state.server.engine.generate([PROMPT], ["cb"], 6)[0].text
            seen["delete"] = http.delete("/v1/adapters/ca").status_code

    monkeypatch.setattr(server, "run", fake_run)
    args = ["serve", "--base", str(ckpt), "--adapters", str(root), "--host", "0.0.0.0", "--port", "9123"]
    result = CliRunner().invoke(
        app, [*args, "--collection", str(tmp_path / "coll"), "--preload", "b", "--preload", "c"]
    )
    assert result.exit_code == 0, result.output
    assert seen["resident"] == ["b", "c"]  # --preload: in slots before the first request
    assert (seen["host"], seen["port"], seen["models"]) == ("0.0.0.0", 9123, ["tiny", "a", "b", "c", "ca", "cb"])
    assert seen["text"] == seen["want"] and seen["delete"] == 409  # a compressed adapter is served, kept whole
    assert "warning" in result.output and "no --api-key" in result.output and "skipped bad name" in result.output
    assert sorted(json.loads((root / ".lorakit-serve" / "registry.json").read_text())["adapters"]) == ["a", "b", "c"]
    unknown = CliRunner().invoke(app, [*args, "--preload", "nope"])
    assert unknown.exit_code != 0 and "unknown adapter 'nope'" in unknown.output
    missing = CliRunner().invoke(app, ["serve", "--base", str(ckpt), "--adapters", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "is not a folder" in missing.output
