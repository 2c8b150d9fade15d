"""OpenAI-compatible HTTP serving of one base and many adapters: ``create_app(engine)``, then ``run(app)``.

    engine = Engine("smollm2-135m", max_slots=32, state_dir="adapters/.lorakit-serve")
    register_adapter_dir(engine, "adapters")
    run(create_app(engine, adapters_dir="adapters", api_key="KEY"))

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (the ``model`` field names
the adapter; "base", the base's own name or no model: the base; several prompts and ``n`` choices
each become one engine request per choice, batched together), both streaming as server-sent
events in OpenAI's chunk format ending with ``data: [DONE]``; ``GET /v1/models``; ``POST
/v1/adapters`` ``{"name", "path"}``; ``DELETE /v1/adapters/{name}``; ``GET /health``; ``GET
/metrics`` (Prometheus text, ``serve/metrics.py``). Errors have OpenAI's shape (``serve/wire.py``):
400 bad JSON or a bad field (named in ``param``), 401 a missing or wrong API key, 403 an adapter
path outside the adapters dir, 404 an unknown model or adapter, 409 a name already taken, 413 a
body over ``max_body_bytes``, 415 a body not sent as ``application/json``, 429 more requests
waiting than ``max_queue`` beyond what the running batch can take, 500 a failed generation (with
the engine's message). A bad request never stops the server, and no answer carries Python's
exception text or the server's folders (``serve/guard.py``).

The engine decodes in its own thread (the app's lifespan starts and stops it). Parsing, chat
templating and tokenizing run on a small thread pool (``prep_workers``), so a large prompt never
stalls the event loop (``/health`` answers meanwhile). Each engine request gets callbacks that put
``(choice, piece)`` for every final piece of text, then ``(choice, None)`` for "done", on its HTTP
request's asyncio queue through ``loop.call_soon_threadsafe``; handlers await that queue, so the
event loop never blocks on generation; the objects loaded before serving (the model, the adapters)
are frozen out of the garbage collector, so its full passes stay short while serving (``/health``'s
worst latency under load: benchmarks/README.md, serve_load phase H). A client that hangs up cancels
its requests, streamed or not (counted as status 499): their batch rows and queue places are freed
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.errors import ConfigError, LorakitError
from lorakit.io.adapter import CONFIG_NAME
from lorakit.serve.cache import check_name
from lorakit.serve.engine import Engine
from lorakit.serve.guard import check_path_text, client_gone, offload, read_json, redact
from lorakit.serve.metrics import ServerMetrics
from lorakit.serve.prompts import Prepared, Prompts
from lorakit.serve.requests import Request
from lorakit.serve.wire import (
    MAX_CHOICES,
    ApiError,
    Job,
    refuse_unsupported,
    sse,
)

BASE_ALIASES = ("", "base")
LIST_HINT = "GET /v1/models lists the served models; POST /v1/adapters registers one."
DEFAULT_MAX_BODY = 8 * 2**20  # bytes of one request body
log = logging.getLogger("lorakit.serve")


class _DoneEvent(threading.Event):
    """A request's ``done`` event that also tells the server's event loop when the engine sets it."""

    def __init__(self, notify: Callable[[], None]):
        super().__init__()
        self._notify = notify

    def set(self) -> None:
        super().set()
        self._notify()


class _Server:
    """What the routes share: the engine, the settings and the metrics."""

    def __init__(
        self,
        engine: Engine,
        *,
        api_key: str | None,
        max_queue: int,
        max_prompt_tokens: int | None,
        base_name: str,
        adapters_dir: Path | None,
        allow_any_path: bool,
        max_body_bytes: int,
        max_prompt_chars: int | None,
        prep_workers: int,
    ):
        self.engine, self.api_key, self.max_queue = engine, api_key, max_queue
        self.base_name, self.base_names = base_name, {*BASE_ALIASES, base_name, engine.base_name}
        self.adapters_dir, self.allow_any_path = adapters_dir, allow_any_path
        self.prompts = Prompts(engine, max_prompt_tokens, max_prompt_chars)
        self.max_body = max_body_bytes
        self.pool = ThreadPoolExecutor(max_workers=prep_workers, thread_name_prefix="lorakit-prep")
        self.roots = {adapters_dir: "<adapters>"} if adapters_dir is not None else {}
        if Path(engine.base_name).is_dir():
            self.roots[Path(engine.base_name).resolve()] = "<base>"
        self.metrics = ServerMetrics(engine)
        self.adapter_lock = asyncio.Lock()
        self.created = int(time.time())

    def public(self, text: str) -> str:
        """``text`` without the server's own folders (the adapters dir and a local base dir)."""
        return redact(text, self.roots)

    async def auth(self, request: HttpRequest) -> None:
        """The API-key check (async: FastAPI would run a plain function on a worker thread per request)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            msg = "missing or wrong API key: send `Authorization: Bearer <key>` with the server's --api-key."
            raise ApiError(401, msg, code="invalid_api_key")

    def served(self, name: str) -> bool:
        return name in self.engine.cache or name in self.engine.compressed

    def unknown_model(self, model: str) -> ApiError:
        why = self.engine.unavailable(model, self.adapters_dir)  # paths relative to the adapters dir
        if why is not None:
            return ApiError(404, f"the adapter {model!r} is unavailable: {why}.", param="model", code="model_not_found")
        msg = (
            f"the model {model!r} does not exist: it is neither the base ({self.base_name!r}) nor a registered "
            f"adapter. {LIST_HINT}"
        )
        return ApiError(404, msg, param="model", code="model_not_found")

    def adapter_of(self, model: Any) -> str | None:
        if model is None or model in self.base_names:
            return None
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string (an adapter name or 'base'), got {model!r}.", param="model")
        if not self.served(model) and not self.engine.revive(model):  # an unavailable one: its folder may be back
            raise self.unknown_model(model)
        return model

    # ---- generation ----

    def prepare(self, body: dict[str, Any], chat: bool) -> Prepared:
        """Check ``body`` and tokenize its prompts (CPU work: the server runs it on its thread pool)."""
        refuse_unsupported(body)
        self.adapter_of(body.get("model"))
        return self.prompts.prepare(body, chat)

    def submit(self, body: dict[str, Any], prepared: Prepared, *, chat: bool) -> Job:
        """Queue the requests of ``body`` (``prepared`` by :meth:`prepare`) on the engine, one per choice
        (429 when the queue is full)."""
        prompts, opts = prepared
        model = body.get("model")
        adapter = self.adapter_of(model)  # again: it may have been removed meanwhile
        self.check_room(len(prompts), opts.n)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

        def notify(item: tuple[int, str | None]) -> None:  # runs on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def request(ids: list[int], i: int, seed: int | None) -> Request:
            on_text = (lambda _req, piece: notify((i, piece))) if opts.stream else None
            done = _DoneEvent(lambda: notify((i, None)))
            o = opts
            return Request(ids, adapter, o.max_tokens, o.temperature, o.top_p, o.stop, seed, on_text=on_text, done=done)

        # prompt p's choice j is reqs[p·n + j] and samples with seed + j: n different answers
        seeds = [None if opts.seed is None else opts.seed + j for j in range(opts.n)]
        reqs = [
            request(ids, p * opts.n + j, seed) for p, (ids, _) in enumerate(prompts) for j, seed in enumerate(seeds)
        ]
        try:
            for req in reqs:
                self.engine.submit(req)
        except ConfigError:  # removed since it was checked
            self.cancel(reqs)
            raise self.unknown_model(str(model)) from None
        return Job(model or self.base_name, opts, reqs, queue, chat)

    def check_room(self, prompts: int, n: int) -> None:
        """A request of ``prompts × n`` choices fits MAX_CHOICES and, now, the engine: what the running batch
        cannot take at its next step waits, and at most ``max_queue`` requests may wait (else a 429)."""
        k = prompts * n
        if k > MAX_CHOICES:
            msg = f"this request asks for {k} completions ({prompts} prompts × n = {n}); send at most {MAX_CHOICES}."
            raise ApiError(400, msg, param="n")
        most = self.max_queue + self.engine.scheduler.max_batch
        if k > most:
            msg = f"this request asks for {k} completions; the server takes at most {most} at once (--max-queue)."
            raise ApiError(400, msg, param="n" if n > 1 else "prompt")
        waiting, free = self.engine.queue_depth(), self.engine.free_rows()
        if waiting + k - free > self.max_queue:
            msg = (
                f"the server is busy: {waiting} requests are waiting and the running batch has room for {free} "
                f"(--max-queue {self.max_queue}); retry later."
            )
            raise ApiError(429, msg, code="queue_full")

    def cancel(self, reqs: list[Request]) -> None:
        for req in reqs:
            self.engine.cancel(req)

    def failure(self, job: Job) -> ApiError | None:
        """The error of the first choice that failed, if any did."""
        req = next((r for r in job.reqs if r.finish_reason == "error"), None)
        if req is None:
            return None
        if req.adapter is not None and not self.served(req.adapter):
            msg = f"the adapter {req.adapter!r} was removed before the request ran. {LIST_HINT}"
            return ApiError(404, msg, param="model", code="model_not_found")
        return ApiError(500, f"generation failed: {req.error}")

    async def events(self, job: Job) -> AsyncIterator[str]:
        """The SSE stream of ``job``: each choice's text pieces as the engine finalises them, then the end."""
        status = 499  # until the stream ends: the client went away
        try:
            if job.chat:
                for i in range(len(job.reqs)):
                    yield sse(job.chunk(i, None, role=True))
            left = len(job.reqs)
            while left:
                i, piece = await job.queue.get()
                if piece is not None:
                    yield sse(job.chunk(i, piece))
                    continue
                left -= 1
                if (error := self.failure(job)) is not None:
                    status = error.status
                    yield sse(error.body())
                    break
                yield sse(job.chunk(i, None, job.reqs[i].finish_reason))
            else:
                status = 200
                if job.options.include_usage:
                    yield sse(job.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if status != 200:  # the client went away, or a choice failed: stop generating the others
                self.cancel(job.reqs)
            self.metrics.observe(job.reqs[0].adapter or "base", status, time.monotonic() - job.start)

    def label(self, body: dict[str, Any]) -> str:
        """The metrics label of a request's model: an adapter name, "base", or "unknown"."""
        model = body.get("model")
        if model is None or model in self.base_names:
            return "base"
        return model if isinstance(model, str) and self.served(model) else "unknown"

    async def generate(self, request: HttpRequest, *, chat: bool) -> Response:
        start, label = time.monotonic(), "invalid"
        try:
            body = await read_json(request, self.max_body, self.pool)
            label = self.label(body)
            job = self.submit(body, await offload(self.pool, self.prepare, body, chat), chat=chat)
        except ApiError as e:
            self.metrics.observe(label, e.status, time.monotonic() - start)
            return e.response()
        except Exception:
            self.metrics.observe(label, 500, time.monotonic() - start)
            raise  # answered by the app's 500 handler
        if job.options.stream:
            return StreamingResponse(self.events(job), media_type="text/event-stream")
        if not await self.finished(job, request):  # the client hung up: nobody reads the answer
            self.cancel(job.reqs)
            self.metrics.observe(label, 499, time.monotonic() - start)
            return Response(status_code=499)
        error = self.failure(job)
        self.metrics.observe(label, 200 if error is None else error.status, time.monotonic() - start)
        return error.response() if error is not None else JSONResponse(job.result())

    async def finished(self, job: Job, request: HttpRequest) -> bool:
        """Wait until every choice of ``job`` is done (True) or the client hangs up first (False)."""

        async def drain() -> None:
            left = len(job.reqs)
            while left:
                left -= (await job.queue.get())[1] is None

        done, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is shutting down
            self.cancel(job.reqs)
            raise
        finally:
            gone.cancel()
            done.cancel()
        return done.done() and not done.cancelled()

    # ---- adapters ----

    def adapter_path(self, raw: Any) -> Path:
        """The adapter dir ``raw`` names (relative to the adapters dir), refused if it leads outside that dir."""
        if not isinstance(raw, str) or not raw:
            raise ApiError(400, "path must be the adapter dir's path (relative to the adapters dir).", param="path")
        check_path_text(raw)
        try:
            path = Path(raw).expanduser()
            if self.adapters_dir is not None and not path.is_absolute():
                path = self.adapters_dir / path
            path = path.resolve()  # follows symlinks: a link out of the adapters dir is outside too
            found = (path / CONFIG_NAME).is_file()
        except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop, ...
            raise ApiError(400, "path is not a path this server's file system can open.", param="path") from None
        if not self.allow_any_path and (self.adapters_dir is None or not path.is_relative_to(self.adapters_dir)):
            where = "inside the adapters dir (--adapters)" if self.adapters_dir else "in an adapters dir"
            msg = f"path {raw!r} is not {where}; put the adapter there, or start the server with --allow-any-path."
            raise ApiError(403, msg, param="path", code="path_not_allowed")
        if not found:
            raise ApiError(400, f"no adapter at {raw!r}: the dir has no {CONFIG_NAME}.", param="path")
        return path

    async def add_adapter(self, request: HttpRequest) -> dict[str, Any]:
        body = await read_json(request, self.max_body, self.pool)
        try:
            name = check_name(body.get("name"))  # type: ignore[arg-type]  # checked there
        except ConfigError as e:
            raise ApiError(400, str(e), param="name") from None
        if name in BASE_ALIASES or name == self.base_name:
            raise ApiError(409, f"{name!r} names the base model; pick another adapter name.", "name", "name_taken")
        path = self.adapter_path(body.get("path"))
        async with self.adapter_lock:
            if self.served(name):
                msg = f"an adapter named {name!r} is already registered; DELETE /v1/adapters/{name} first."
                raise ApiError(409, msg, param="name", code="adapter_exists")
            try:
                await asyncio.to_thread(self.engine.add_adapter, name, path)
            except (LorakitError, OSError) as e:
                msg = self.public(f"cannot load the adapter at {body['path']!r}: {e}")
                raise ApiError(400, msg, param="path") from None
        return {**self.model_card(name), "path": self.public(str(path))}

    async def remove_adapter(self, name: str) -> dict[str, Any]:
        async with self.adapter_lock:
            if name in self.engine.compressed:
                msg = f"{name!r} belongs to a compressed collection, which is served whole; restart without it."
                raise ApiError(409, msg, param="name", code="in_collection")
            try:
                await asyncio.to_thread(self.engine.remove_adapter, name)
            except ConfigError:
                msg = f"no adapter named {name!r} is registered. {LIST_HINT}"
                raise ApiError(404, msg, param="name", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True}

    def model_card(self, name: str) -> dict[str, Any]:
        parent = None if name == self.base_name else self.base_name
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "lorakit",
            "root": self.base_name,
            "parent": parent,
        }

    def models(self) -> dict[str, Any]:
        self.engine.revive_all()  # unavailable adapters whose folders are back are listed again
        return {"object": "list", "data": [self.model_card(n) for n in [self.base_name, *self.engine.adapters()]]}

    def health(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "status": "ok",
            "base": self.base_name,
            "adapters": len(engine.adapters()),
            "queue_depth": engine.queue_depth(),
            "running": len(engine.running),
        }


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    max_queue: int = 256,
    max_prompt_tokens: int | None = None,
    base_name: str | None = None,
    adapters_dir: str | Path | None = None,
    allow_any_path: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_prompt_chars: int | None = None,
    prep_workers: int = 2,
) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan starts the engine's thread and stops it.

    ``max_queue`` requests may wait beyond what the running batch can take; more get a 429.
    ``POST /v1/adapters`` loads only from inside ``adapters_dir`` (relative paths are relative to
    it) unless ``allow_any_path``. ``base_name`` (default: ``engine.base_name``, or its folder's
    name when that is a local dir) is the base's model id, besides "base". Bodies over
    ``max_body_bytes`` get a 413; prompts over ``max_prompt_chars`` characters (default
    ``prompts.CHARS_PER_TOKEN`` × the token limit) a 400 before tokenizing; ``prep_workers`` threads parse,
    template and tokenize.
    """
    for name, value, low in (("max_queue", max_queue, 0), ("max_body_bytes", max_body_bytes, 1)):
        if value < low:
            raise ConfigError(f"{name} must be ≥ {low}, got {value}.")
    if prep_workers < 1 or (max_prompt_chars is not None and max_prompt_chars < 1):
        raise ConfigError(f"prep_workers and max_prompt_chars must be ≥ 1, got {prep_workers}, {max_prompt_chars}.")
    root = Path(adapters_dir).expanduser().resolve() if adapters_dir is not None else None
    server = _Server(
        engine,
        api_key=api_key,
        max_queue=max_queue,
        max_prompt_tokens=max_prompt_tokens,
        base_name=base_name or _public_name(engine.base_name),
        adapters_dir=root,
        allow_any_path=allow_any_path,
        max_body_bytes=max_body_bytes,
        max_prompt_chars=max_prompt_chars,
        prep_workers=prep_workers,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        gc.collect()
        gc.freeze()  # the model and adapters loaded so far are never scanned again: shorter GC pauses
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            server.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.server = server
    _error_handlers(app)
    _routes(app, server)
    return app


def _public_name(base: str) -> str:
    """The base's model id as clients see it: a local checkpoint dir by its folder's name, never its path."""
    return Path(base).name if Path(base).is_dir() else base


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(_request: HttpRequest, e: HTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: HttpRequest, e: Exception) -> JSONResponse:
        log.error("internal error answering %s %s", request.method, request.url.path, exc_info=e)
        return ApiError(500, "internal error; the server's log has the details.").response()


def _routes(app: FastAPI, server: _Server) -> None:
    auth = [Depends(server.auth)]

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: HttpRequest) -> Response:
        return await server.generate(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: HttpRequest) -> Response:
        return await server.generate(request, chat=True)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return await offload(server.pool, server.models)  # may look at unavailable adapters' folders

    @app.post("/v1/adapters", dependencies=auth)
    async def add_adapter(request: HttpRequest) -> dict[str, Any]:
        return await server.add_adapter(request)

    @app.delete("/v1/adapters/{name}", dependencies=auth)
    async def remove_adapter(name: str) -> dict[str, Any]:
        return await server.remove_adapter(name)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return server.health()

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def register_adapter_dir(
    engine: Engine, root: str | Path, *, allow_any_path: bool = False
) -> tuple[list[str], dict[str, str]]:
    """Register every direct subfolder of ``root`` that holds an adapter, under the folder's name.

    Returns (registered names, {skipped name: why}). A name the registry restored with the same
    path is kept as it is; a name deleted with DELETE /v1/adapters stays deleted until POSTed again.
    Unless ``allow_any_path``, the containment of POST /v1/adapters holds here too: a subfolder
    that links outside ``root`` is skipped, and a restored adapter outside ``root`` stays
    registered but unavailable (the registry keeps it for a server that may read it).
    """
    root = Path(root).expanduser().resolve()
    engine.cache.scan_root = root
    outside = "outside --adapters; start with --allow-any-path to serve it"
    for name, path in engine.cache.entries().items():
        if not allow_any_path and not Path(path).resolve().is_relative_to(root):
            engine.cache.refuse(name, f"{path} is {outside}")
    done: list[str] = []
    skipped: dict[str, str] = {}
    for sub in sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file()):
        known = engine.cache.path_of(sub.name)
        if sub.name in engine.cache.removed:
            skipped[sub.name] = "removed with DELETE /v1/adapters; POST /v1/adapters registers it again"
        elif not allow_any_path and not sub.resolve().is_relative_to(root):
            skipped[sub.name] = f"{sub} is a link {outside}"
        elif known is not None and Path(known).resolve() == sub.resolve():
            done += [sub.name] if sub.name in engine.cache else []  # else unavailable, and logged as such
        else:
            try:
                engine.add_adapter(sub.name, sub)
                done.append(sub.name)
            except LorakitError as e:
                skipped[sub.name] = str(e)
    return done, skipped


def run(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (open streams get 5 s to finish on shutdown)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
