"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and every adapter in a folder."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.cli._common import QUANTIZE_HELP, err, friendly_errors
from lorakit.errors import ConfigError

Opt = typer.Option
STATE_DIR = ".lorakit-serve"  # under --adapters: the registry of adapters added over HTTP


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@friendly_errors
def serve(
    adapters: Annotated[Path, Opt(help="Folder of adapter dirs: each subfolder is served under its name.")],
    base: Annotated[str, Opt(help="Bundled base model name or local checkpoint dir.")] = "smollm2-135m",
    quantize: Annotated[str | None, Opt(help=QUANTIZE_HELP)] = None,
    host: Annotated[str, Opt(help="Address to bind (loopback by default; anything else is reachable).")] = "127.0.0.1",
    port: Annotated[int, Opt(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, Opt(envvar="LORAKIT_API_KEY", help="Require `Authorization: Bearer KEY` (or $LORAKIT_API_KEY).")
    ] = None,
    max_slots: Annotated[int, Opt(min=1, help="Adapters usable in one batch (more wait in RAM).")] = 32,
    max_queue: Annotated[
        int, Opt(min=0, help="Requests that may wait beyond what the running batch can take; more get 429.")
    ] = 256,
    max_batch: Annotated[int, Opt(min=1, help="Requests decoded together.")] = 64,
    max_prompt_tokens: Annotated[int | None, Opt(min=1, help="Longest prompt accepted (default: the model's).")] = None,
    max_prompt_chars: Annotated[
        int | None, Opt(min=1, help="Longest prompt in characters, refused before tokenizing (default: 16/token).")
    ] = None,
    max_body_bytes: Annotated[int, Opt(min=1, help="Largest request body; larger ones get 413.")] = 8 * 2**20,
    collection: Annotated[
        list[Path] | None, Opt(help="A compressed collection (`lorakit compress`) to serve too; repeatable.")
    ] = None,
    preload: Annotated[
        list[str] | None, Opt(help="An adapter to copy into a slot at start, not on its first request; repeatable.")
    ] = None,
    allow_any_path: Annotated[
        bool,
        Opt(help="Serve adapters from anywhere (POST /v1/adapters, links, the registry), not only inside --adapters."),
    ] = False,
    log_level: Annotated[str, Opt(help="uvicorn log level: critical, error, warning, info, debug.")] = "info",
) -> None:
    """Serve BASE and the adapters under ADAPTERS over an OpenAI-compatible HTTP API.

    POST /v1/completions and /v1/chat/completions with "model" set to an adapter's name ("base" or
    none: the base model); GET /v1/models; POST /v1/adapters {"name", "path"} and DELETE
    /v1/adapters/NAME; GET /health and /metrics (Prometheus). Adapters added and deleted over
    HTTP are remembered in ADAPTERS/.lorakit-serve/ across restarts; one whose folder is missing
    at start stays registered, unavailable, until the folder is back.
    """
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import create_app, register_adapter_dir, run

    if not adapters.is_dir():
        raise ConfigError(f"--adapters {adapters} is not a folder; create it (it may be empty) or fix the path.")
    if not _loopback(host):
        reach = "anyone who can reach this machine" + ("" if api_key else " (no --api-key set!)")
        err.print(f"[yellow]warning:[/] binding {host} exposes the server to {reach}.", soft_wrap=True)
    with err.status(f"loading {base}"):
        model: Any = base
        tok: Any = None
        if quantize is not None:
            import lorakit as lk

            model, tok = lk.load_base(base, quantize=quantize)
        engine = Engine(model, tok, max_slots=max_slots, max_batch=max_batch, state_dir=adapters / STATE_DIR)
    with err.status(f"registering the adapters in {adapters}"):
        _, skipped = register_adapter_dir(engine, adapters, allow_any_path=allow_any_path)
        for path in collection or []:
            engine.add_collection(path)
        engine.preload(preload or [])
    for name, why in skipped.items():
        err.print(f"skipped {name}: {why}", soft_wrap=True, markup=False)
    err.print(f"serving {base} + {len(engine.adapters())} adapter(s) on http://{host}:{port}/v1", soft_wrap=True)
    app = create_app(
        engine,
        api_key=api_key,
        max_queue=max_queue,
        max_prompt_tokens=max_prompt_tokens,
        max_prompt_chars=max_prompt_chars,
        max_body_bytes=max_body_bytes,
        adapters_dir=adapters,
        allow_any_path=allow_any_path,
    )
    run(app, host=host, port=port, log_level=log_level)
