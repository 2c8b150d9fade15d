"""A hostile client against a live server on loopback: large bodies, hang-ups, malformed input, cross-site posts."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.serve.test_server import JSON, PROMPT, TIMEOUT, World, metric_values, serving


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("guard"))


@pytest.fixture(scope="module")
def guarded(world):
    """A server with small limits: 64 KB bodies, 2,000-character prompts."""
    engine = world.engine(max_slots=2)
    with serving(engine, adapters_dir=world.root, max_body_bytes=2**16, max_prompt_chars=2000) as url:
        yield engine, url


def post(url, path, body, **kw):
    return httpx.post(f"{url}{path}", content=body, headers=kw.pop("headers", JSON), timeout=TIMEOUT, **kw)


def assert_clean_error(r, status, param=None):
    """OpenAI's error shape, no Python internals and no server folder in the message."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    for leak in ("Traceback", "Error:", "Exception", "/tmp", "/work", "pytest-"):
        assert leak not in error["message"], error["message"]
    return error


def test_bodies_over_the_limit_are_413_and_the_server_carries_on(guarded):
    _, url = guarded
    big = json.dumps({"prompt": "x" * 2**17}).encode()
    assert assert_clean_error(post(url, "/v1/completions", big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: refused once the stream passes the limit
        for _ in range(8):
            yield b" " * 2**15

    assert_clean_error(post(url, "/v1/completions", chunks()), 413)
    assert_clean_error(post(url, "/v1/adapters", big), 413)
    long = json.dumps({"prompt": "x" * 3000}).encode()  # under the body limit, over 2,000 characters
    error = assert_clean_error(post(url, "/v1/completions", long), 400, "prompt")
    assert "--max-prompt-chars" in error["message"] and error["code"] == "context_length_exceeded"
    chat = {"messages": [{"role": "user", "content": "y" * 1500}, {"role": "user", "content": "y" * 1500}]}
    assert_clean_error(post(url, "/v1/chat/completions", json.dumps(chat).encode()), 400, "messages")
    listed = {"prompt": ["ok", "z" * 2500]}
    assert_clean_error(post(url, "/v1/completions", json.dumps(listed).encode()), 400, "prompt[1]")
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_tokenizing_runs_off_the_event_loop(guarded, monkeypatch):
    """While one request is stuck in tokenizing, /health and other requests still answer."""
    engine, url = guarded
    entered, release = threading.Event(), threading.Event()
    encode = engine.encode

    def slow_encode(prompt):
        if prompt == "stuck":
            entered.set()
            assert release.wait(TIMEOUT)
        return encode(prompt)

    monkeypatch.setattr(engine, "encode", slow_encode)
    stuck: dict = {}
    body = {"model": "a", "prompt": "stuck", "max_tokens": 2, "temperature": 0}
    thread = threading.Thread(
        target=lambda: stuck.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT))
    )
    thread.start()
    try:
        assert entered.wait(TIMEOUT)
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200  # would hang on a blocked loop
        other = httpx.post(f"{url}/v1/completions", json={**body, "prompt": PROMPT}, timeout=TIMEOUT)
        assert other.status_code == 200 and not stuck
    finally:
        release.set()
        thread.join(TIMEOUT)
    assert stuck["r"].status_code == 200


def _abandon(url, body, *, after=0.5):
    """Send ``body`` and hang up after ``after`` seconds without reading the answer."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=after))


def _wait_for(condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_abandoned_requests_are_cancelled_and_counted_as_499(world, monkeypatch):
    engine = world.engine()
    with serving(engine) as url:
        engine.stop()  # paused: abandoned requests wait in the queue, then leave it when their clients go
        for _ in range(3):
            _abandon(url, {"model": "a", "prompt": PROMPT, "max_tokens": 4})
        _wait_for(lambda: engine.queue_depth() == 0, "the abandoned requests stayed queued")
        engine.start()
        decode = engine.scheduler._decode

        def slow_decode():  # a running request that would take 200 × 0.05 s
            time.sleep(0.05)
            decode()

        monkeypatch.setattr(engine.scheduler, "_decode", slow_decode)
        before = engine.tokens_generated
        _abandon(url, {"model": "b", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stop": ["\x7f"]})
        _wait_for(lambda: not engine.running and engine.queue_depth() == 0, "the abandoned request kept running")
        assert engine.tokens_generated - before < 200  # stopped early, not run to its end
        monkeypatch.undo()
        values = metric_values(url)
        assert values[("lorakit_requests_total", (("adapter", "a"), ("status", "499")))] == 3
        assert values[("lorakit_requests_total", (("adapter", "b"), ("status", "499")))] == 1
        assert ("lorakit_requests_total", (("adapter", "a"), ("status", "200"))) not in values
        ok = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200


MALFORMED = [  # (path, raw body, the field the error names)
    ("/v1/completions", b"[" * 20_000 + b"]" * 20_000, None),  # deeper than the JSON parser recurses
    ("/v1/completions", b'{"prompt": "x", "extra": ' + b"[" * 40 + b"]" * 40 + b"}", "extra" + "[0]" * 31),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt[1]"),
    ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', "messages[0].role"),
    ("/v1/completions", b"\xff\xfe{}", None),  # not UTF-8
    ("/v1/adapters", json.dumps({"name": "n", "path": "a\x00b"}).encode(), "path"),
    ("/v1/adapters", json.dumps({"name": "n", "path": "d/" * 2500}).encode(), "path"),
    ("/v1/adapters", json.dumps({"name": "n", "path": "x" * 300}).encode(), "path"),  # a file name over 255 bytes
    ("/v1/adapters", b'{"name": "n", "path": "\\ud800"}', "path"),
]


@pytest.mark.parametrize(("path", "body", "param"), MALFORMED)
def test_malformed_input_is_a_clean_400(guarded, world, path, body, param):
    _, url = guarded
    error = assert_clean_error(post(url, path, body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/adapters"])
@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_only_json_bodies_act(guarded, path, kind):
    """A cross-site "simple" request (form or text, no preflight) is a 415 and changes nothing."""
    engine, url = guarded
    body = json.dumps({"name": "csrf", "path": "extra/new", "prompt": PROMPT, "messages": [{"role": "user"}]})
    headers = {"Content-Type": kind} if kind else {}
    r = httpx.post(f"{url}{path}", content=body.encode(), headers=headers, timeout=TIMEOUT)
    assert assert_clean_error(r, 415)["code"] == "unsupported_media_type"
    assert "csrf" not in engine.adapters()
    ok = post(
        url,
        "/v1/completions",
        json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_no_server_paths_in_answers(world, tmp_path):
    """/health, /v1/models and errors name the base by its folder and adapters relative to --adapters."""
    base = tmp_path / "my-base"
    world.base.save_pretrained(base)
    world.tok.save_pretrained(base)
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import register_adapter_dir

    engine = Engine(str(base))
    register_adapter_dir(engine, world.root)
    (world.root / "broken").mkdir(exist_ok=True)
    (world.root / "broken" / "adapter_config.json").write_text("{")
    try:
        with serving(engine, adapters_dir=world.root) as url:
            answers = [
                httpx.get(f"{url}/health", timeout=TIMEOUT).text,
                httpx.get(f"{url}/v1/models", timeout=TIMEOUT).text,
                httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": "broken"}, timeout=TIMEOUT).text,
                httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": "../x"}, timeout=TIMEOUT).text,
                httpx.post(f"{url}/v1/adapters", json={"name": "y", "path": "extra/new"}, timeout=TIMEOUT).text,
            ]
            assert json.loads(answers[1])["data"][0]["id"] == "my-base"
            by_path = {"model": str(base), "prompt": PROMPT, "max_tokens": 1}  # the path still names the base
            assert httpx.post(f"{url}/v1/completions", json=by_path, timeout=TIMEOUT).status_code == 200
    finally:
        (world.root / "broken" / "adapter_config.json").unlink()
        (world.root / "broken").rmdir()
    for text in answers:
        assert str(tmp_path) not in text and str(world.root) not in text, text
