"""Load test of `lorakit serve` on loopback: many requests, many adapters, adapters added and removed meanwhile.

Workload: a random `smollm2-shape` base with 2 layers (`lorakit.testing.smollm2_shape(2)`, SmolLM2's
real tokenizer), saved as a checkpoint dir; `--adapters` (default 100) plain LoRA adapters on all
linear layers, ranks cycling 8/16/32/64, written under a temp `--adapters` dir; the server is the
real CLI (`lorakit serve`) in a child process with `OMP_NUM_THREADS=--threads`.

Phase A (`--requests`, default 1,000, at `--concurrency`, default 64, in two halves on one server):
each request picks adapter ``floor(n · u^(1/α))`` (u ~ U(0,1), α = 0.5: Zipf-like skew, as in
WORKLOADS.md) or, one time in 20, the base; a quarter are chat requests and a quarter stream; half
are greedy, half sampled (temperature 0.8). Meanwhile a churn task loops: POST /v1/adapters a new
name (from one of 8 adapter dirs nested under the adapters dir), send 2 requests to it, DELETE it.
Memory: the server's RSS after start-up, after a warm-up, after each half, and its peak (VmHWM).
Phase H (hostile, on phase A's server): `--requests-hostile` (default 300) requests of the same mix,
run clean and hostile alternately `--hostile-reps` times (default 2). Hostile: meanwhile one client
sends `--big-prompts` (default 1) prompts of `--big-prompt-mb` (default 20) MB, and `--abandoners`
(default 16) clients each send `--abandon-each` (default 1) 200-token requests and hang up after
0.5 s. A prober GETs /health
every 50 ms throughout. Reports p99 latency and requests/s of the normal traffic (median over the
runs) and their hostile/clean ratios, /health's worst latency, and the server's RSS before and 2 s
after the phase.
Phase B: a fresh server with `--max-queue --small-queue` (default 16) and the same traffic for
`--requests-429` requests (default 200) at `--concurrency-429` (default 32), to show the intended
429s (with `Retry-After: 1`; a worker that gets one waits 0.25 s before its next request) and that
every other request still succeeds. `--phases` picks phases (default a,b,h).

Prints one JSON object (requests ok / 429 / other failures, p50/p99 latency, requests/s and
tokens/s, RSS in MB, adapter bytes resident from /metrics, slot loads and evictions).

    .venv/bin/python benchmarks/serve_load.py [--adapters 100] [--requests 1000] [--concurrency 64] [--phases a,b,h]
        [--json-out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

HIDDEN, MLP, KV = 576, 1536, 192
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
RANKS = (8, 16, 32, 64)
CHURN_DIRS = 8
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "word",
    "but",
    "what",
    "some",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "there",
    "when",
    "up",
    "use",
    "your",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
]


def make_base(root: Path, layers: int) -> Path:
    """A random smollm2-shape checkpoint with SmolLM2's own tokenizer, as `lorakit serve --base DIR` loads it."""
    from transformers import AutoTokenizer

    from lorakit.models import base_dir
    from lorakit.testing import smollm2_shape

    model = smollm2_shape(layers)
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(base_dir("smollm2-135m")).save_pretrained(root / "base")
    return root / "base"


def make_adapters(adapters: Path, n: int, layers: int, base: Path) -> None:
    """``n`` LoRA dirs a000... (ranks cycling 8/16/32/64) and CHURN_DIRS more under churn/, all-linear."""
    from transformers import AutoModelForCausalLM

    from lorakit.io.adapter import base_fingerprint
    from lorakit.io.factors import AdapterFactors, write_factors
    from lorakit.methods._api import LoraFactors

    modules = [f"model.layers.{i}.{m}" for i in range(layers) for m in SHAPES]
    fingerprint = base_fingerprint(AutoModelForCausalLM.from_pretrained(base), modules)
    for i in range(n + CHURN_DIRS):
        g, r = torch.Generator().manual_seed(i), RANKS[i % len(RANKS)]
        factors = {}
        for module in modules:
            d_out, d_in = SHAPES[module.split(".", 3)[3]]
            A = torch.randn(r, d_in, generator=g) / d_in**0.5  # (r, in)
            B = torch.randn(d_out, r, generator=g) * 0.02  # (out, r)
            factors[module] = LoraFactors(A, B, 1.0)
        path = adapters / f"a{i:03d}" if i < n else adapters / "churn" / f"c{i - n}"
        kinds = dict.fromkeys(factors, "linear")
        write_factors(path, AdapterFactors(factors, kinds, base_name=str(base), fingerprint=fingerprint))


def rss_mb(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM")}


@contextlib.contextmanager
def serving(base: Path, adapters: Path, *, max_queue: int, max_slots: int, threads: int) -> Iterator[Any]:
    """`lorakit serve` in a child process on a free loopback port; yields (url, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        "from lorakit.cli import main; main()",
        "serve",
        "--base",
        str(base),
        "--adapters",
        str(adapters),
        "--port",
        str(port),
        "--max-slots",
        str(max_slots),
        "--max-queue",
        str(max_queue),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONFAULTHANDLER": "1"}
    log = adapters.parent / f"server-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def plan(n_requests: int, n_adapters: int, seed: int, alpha: float = 0.5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_requests):
        model = "base" if rng.random() < 0.05 else f"a{int(n_adapters * rng.random() ** (1 / alpha)):03d}"
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
        chat, stream = rng.random() < 0.25, rng.random() < 0.25
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 12), "stream": stream}
        body["temperature"] = 0.0 if rng.random() < 0.5 else 0.8
        body.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
        if stream:
            body["stream_options"] = {"include_usage": True}
        out.append(body)
    return out


async def one(http: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, float, int]:
    """(HTTP status, or -1 for a broken connection/stream, or 502 for an error event; seconds; tokens)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    t0 = time.perf_counter()
    tokens = 0
    try:
        if not body["stream"]:
            r = await http.post(path, json=body)
            status = r.status_code
            tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
        else:
            async with http.stream("POST", path, json=body) as r:
                status, done = r.status_code, r.status_code != 200
                async for line in r.aiter_lines():
                    event = json.loads(line[6:]) if line.startswith("data: {") else {}
                    tokens = event.get("usage", {}).get("completion_tokens", tokens) if event.get("usage") else tokens
                    status = 502 if "error" in event else status
                    done = done or line == "data: [DONE]"
                status = status if done else -1
    except (httpx.HTTPError, ValueError, KeyError):
        status = -1
    return status, time.perf_counter() - t0, tokens


async def churn(http: httpx.AsyncClient, stop: asyncio.Event) -> collections.Counter[str]:
    """POST a new adapter name, send it 2 requests, DELETE it; again until ``stop``."""
    counts: collections.Counter[str] = collections.Counter()
    k = 0
    while not stop.is_set():
        name = f"churn-{k}"
        r = await http.post("/v1/adapters", json={"name": name, "path": f"churn/c{k % CHURN_DIRS}"})
        counts[f"post_{r.status_code}"] += 1
        for _ in range(2):
            status, _, _ = await one(http, {"model": name, "prompt": "the a of", "max_tokens": 4, "stream": False})
            counts[f"request_{status}"] += 1
        counts[f"delete_{(await http.delete(f'/v1/adapters/{name}')).status_code}"] += 1
        k += 1
    return counts


async def drive(
    url: str, bodies: list[dict[str, Any]], concurrency: int, *, with_churn: bool, backoff: float = 0.25
) -> dict[str, Any]:
    """Send ``bodies`` with ``concurrency`` workers; returns statuses, latencies, tokens, wall time, churn counts."""
    results: list[tuple[int, float, int]] = []
    todo = collections.deque(bodies)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def worker() -> None:
            while todo:
                results.append(await one(http, todo.popleft()))
                if results[-1][0] == 429:
                    await asyncio.sleep(backoff)  # as a client honouring Retry-After would, if shorter

        stop = asyncio.Event()
        churner = asyncio.create_task(churn(http, stop)) if with_churn else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        churned = await churner if churner is not None else collections.Counter()
    return {"results": results, "wall_s": wall, "churn": dict(churned)}


async def abandoner(url: str, times: int, hang_up: float) -> int:
    """Send ``times`` long requests (200 tokens), each hung up on after ``hang_up`` seconds."""
    body = {"model": "a000", "prompt": "the a of to and", "max_tokens": 200, "temperature": 0.8}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=hang_up)) as http:
        for _ in range(times):
            with contextlib.suppress(httpx.HTTPError):
                await http.post("/v1/completions", json=body)
    return times


async def big_prompts(url: str, times: int, mb: int) -> collections.Counter[str]:
    """Send ``times`` prompts of ``mb`` MB (a declared body, as the OpenAI client sends it), 1 s apart."""
    body = await asyncio.to_thread(lambda: json.dumps({"model": "a000", "prompt": "the " * (mb * 2**18)}).encode())
    counts: collections.Counter[str] = collections.Counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for _ in range(times):
            try:
                r = await http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
                counts[str(r.status_code)] += 1
            except httpx.HTTPError as e:
                counts[type(e).__name__] += 1
            await asyncio.sleep(1.0)
    return counts


PROBE = """
import sys, time, json, httpx
out = []
with httpx.Client(base_url=sys.argv[1], timeout=10) as http:
    while sys.stdin.readline().strip() == "go":  # one probe per line the parent writes
        t0 = time.perf_counter()
        try:
            ok = http.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        out.append(time.perf_counter() - t0 if ok else 10.0)
        print(json.dumps(out[-1]), flush=True)
print(json.dumps(out), flush=True)
"""


async def prober(url: str, stop: asyncio.Event, every: float = 0.05) -> list[float]:
    """GET /health every ``every`` seconds from a separate process (the client's own loop is busy); each
    answer's latency (10 s for none)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, url, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    while not stop.is_set():
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        await proc.stdout.readline()
        await asyncio.sleep(every)
    proc.stdin.write(b"stop\n")
    await proc.stdin.drain()
    out = json.loads((await proc.stdout.readline()).decode())
    await proc.wait()
    return out


async def traffic(url: str, bodies: list[dict[str, Any]], concurrency: int, *, hostile: bool, args: Any) -> dict:
    """Normal traffic with a /health prober; with ``hostile``, also big prompts and abandoning clients."""
    stop = asyncio.Event()
    probe = asyncio.create_task(prober(url, stop))
    extra = []
    if hostile:
        extra = [asyncio.create_task(big_prompts(url, args.big_prompts, args.big_prompt_mb))]
        extra += [asyncio.create_task(abandoner(url, args.abandon_each, 0.5)) for _ in range(args.abandoners)]
    run = await drive(url, bodies, concurrency, with_churn=False)
    stop.set()
    health = await probe
    others = [await t for t in extra]
    run["health_s"] = health
    if hostile:
        run["big_prompt_statuses"] = dict(others[0])
        run["abandoned_requests"] = sum(others[1:])
    return run


def hostile_phase(url: str, pid: int, args: Any) -> dict[str, Any]:
    """Clean and hostile runs of the same traffic, alternating; RSS before and after; /health latency."""
    bodies = plan(args.requests_hostile, args.adapters, args.seed + 3)
    runs: dict[str, list[dict[str, Any]]] = {"clean": [], "hostile": []}
    asyncio.run(drive(url, plan(args.concurrency, args.adapters, args.seed + 4), args.concurrency, with_churn=False))
    rss_before = rss_mb(pid)["VmRSS"]
    for _ in range(args.hostile_reps):
        for side in ("clean", "hostile"):
            runs[side].append(asyncio.run(traffic(url, bodies, args.concurrency, hostile=side == "hostile", args=args)))
    time.sleep(2.0)  # abandoned work drains
    rss_after = rss_mb(pid)["VmRSS"]
    out: dict[str, Any] = {}
    for side, rs in runs.items():
        each = [summarize([r]) for r in rs]
        health = [h for r in rs for h in r["health_s"]]
        out[side] = {
            "latency_p99_s": statistics.median(e["latency_p99_s"] for e in each),
            "requests_per_s": statistics.median(e["requests_per_s"] for e in each),
            "ok": sum(e["ok"] for e in each),
            "failures": sum(e["requests"] - e["ok"] for e in each),
            "runs": each,
            "health_max_ms": round(1000 * max(health), 1),
            "health_p99_ms": round(1000 * statistics.quantiles(health, n=100)[98], 1),
            "health_over_100ms": sum(h > 0.1 for h in health),
            "health_probes": len(health),
        }
        if side == "hostile":
            out[side]["big_prompt_statuses"] = dict(
                sum((collections.Counter(r["big_prompt_statuses"]) for r in rs), collections.Counter())
            )
            out[side]["abandoned_requests"] = sum(r["abandoned_requests"] for r in rs)
    c, h = out["clean"], out["hostile"]
    out["ratio"] = {
        "p99_hostile_over_clean": round(h["latency_p99_s"] / c["latency_p99_s"], 3),
        "throughput_hostile_over_clean": round(h["requests_per_s"] / c["requests_per_s"], 3),
        "rss_after_over_before": round(rss_after / rss_before, 3),
    }
    out["rss_mb"] = {"before": rss_before, "after": rss_after, "peak_VmHWM": rss_mb(pid)["VmHWM"]}
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for run in runs for r in run["results"]]
    wall = sum(run["wall_s"] for run in runs)
    statuses = collections.Counter(s for s, _, _ in results)
    ok = sorted(t for s, t, _ in results if s == 200)
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [float("nan")] * 99
    return {
        "requests": len(results),
        "ok": statuses[200],
        "rejected_429": statuses[429],
        "other_failures": len(results) - statuses[200] - statuses[429],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_p50_s": round(q[49], 3),
        "latency_p99_s": round(q[98], 3),
        "wall_s": round(wall, 1),
        "requests_per_s": round(statuses[200] / wall, 2),
        "tokens_per_s": round(sum(n for s, _, n in results if s == 200) / wall, 1),
    }


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    keep = (
        "lorakit_slot_loads_total",
        "lorakit_slot_evictions_total",
        "lorakit_generated_tokens_total",
        "lorakit_adapters_registered",
        "lorakit_slots",
    )
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in keep:
                out[s.name] = s.value
            elif s.name == "lorakit_adapter_bytes":
                out[f"adapter_bytes_{s.labels['where']}"] = s.value
    return out


def phase_a(url: str, pid: int, args: Any) -> dict[str, Any]:
    """A warm-up, then ``--requests`` in two halves with adapter churn; RSS after each."""
    bodies = plan(args.requests, args.adapters, args.seed)
    half = len(bodies) // 2
    rss = {"after_start": rss_mb(pid)["VmRSS"]}
    asyncio.run(drive(url, plan(args.concurrency, args.adapters, args.seed + 1), args.concurrency, with_churn=False))
    rss["after_warmup"] = rss_mb(pid)["VmRSS"]
    first = asyncio.run(drive(url, bodies[:half], args.concurrency, with_churn=True))
    rss["after_half_1"] = rss_mb(pid)["VmRSS"]
    second = asyncio.run(drive(url, bodies[half:], args.concurrency, with_churn=True))
    mem = rss_mb(pid)
    rss["after_half_2"], rss["peak_VmHWM"] = mem["VmRSS"], mem["VmHWM"]
    churn_counts = collections.Counter(first["churn"]) + collections.Counter(second["churn"])
    return {
        "phase_a": {**summarize([first, second]), "halves": [summarize([first]), summarize([second])]},
        "churn": dict(sorted(churn_counts.items())),
        "rss_mb": rss,
        "server_metrics": scrape(url),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--adapters", type=int, default=100, help="registered adapters (default 100)")
    ap.add_argument("--requests", type=int, default=1000, help="phase A requests (default 1000)")
    ap.add_argument("--requests-429", type=int, default=200, help="phase B requests (default 200)")
    ap.add_argument("--small-queue", type=int, default=16, help="phase B's --max-queue (default 16)")
    ap.add_argument("--concurrency-429", type=int, default=32, help="phase B's concurrency (default 32)")
    ap.add_argument("--requests-hostile", type=int, default=300, help="phase H requests per run (default 300)")
    ap.add_argument("--hostile-reps", type=int, default=2, help="phase H clean/hostile run pairs (default 2)")
    ap.add_argument("--big-prompt-mb", type=int, default=20, help="phase H's big prompt in MB (default 20)")
    ap.add_argument("--big-prompts", type=int, default=1, help="phase H's big prompts per run (default 1)")
    ap.add_argument("--abandoners", type=int, default=16, help="phase H's clients that hang up (default 16)")
    ap.add_argument("--abandon-each", type=int, default=1, help="requests each abandoner sends (default 1)")
    ap.add_argument("--phases", default="a,b,h", help="which phases to run: a, b, h (default all)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-slots", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON object to this file")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lorakit-serve-load-") as tmp:
        root = Path(tmp)
        base = make_base(root, args.layers)
        make_adapters(root / "adapters", args.adapters, args.layers, base)
        phases = set(args.phases.split(","))
        found: dict[str, Any] = {}
        if phases & {"a", "h"}:
            with serving(base, root / "adapters", max_queue=256, max_slots=args.max_slots, threads=args.threads) as (
                url,
                proc,
            ):
                if "a" in phases:
                    found.update(phase_a(url, proc.pid, args))
                if "h" in phases:
                    found["phase_h_hostile"] = hostile_phase(url, proc.pid, args)
        if "b" in phases:
            bodies_b = plan(args.requests_429, args.adapters, args.seed + 2)
            with serving(
                base, root / "adapters", max_queue=args.small_queue, max_slots=args.max_slots, threads=args.threads
            ) as (url, _):
                phase_b = asyncio.run(drive(url, bodies_b, args.concurrency_429, with_churn=False))
            found["phase_b_small_queue"] = summarize([phase_b])
    result = {
        "workload": f"serve_load: smollm2-shape {args.layers}L, {args.adapters} adapters r∈{{8,16,32,64}}, "
        f"Zipf α=0.5, {args.concurrency} concurrent, loopback",
        "lorakit": found,
        "peer": None,
        "ratio": None,
        "settings": vars(args) | {"json_out": str(args.json_out) if args.json_out else None},
        "torch": torch.__version__,
        "loadavg_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=1))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
