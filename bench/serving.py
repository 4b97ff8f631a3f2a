"""Load generator for any OpenAI-compatible server (kiln, vLLM, llama.cpp, TGI's OpenAI
route): a seeded workload sent at a fixed concurrency or with Poisson arrivals, streaming, and
a report of throughput, time to first token and inter-token latency (p50/p90/p99) and errors.

    python bench/serving.py --url http://127.0.0.1:8080 --concurrency 1,8,32,64
    python bench/serving.py --url http://127.0.0.1:8080 --rate 4 --requests 200
    python bench/serving.py --start-kiln --concurrency 8      # starts `kiln serve` itself
    python bench/serving.py --shared-prefix-words 700 --concurrency 8   # one prefix for all prompts

`extra_body` (`--extra-body JSON`) adapts the request to a server: its keys are merged into
every request body, and a key set to null is removed (llama.cpp has no `ignore_eos`, so
`{"ignore_eos": null, "min_tokens": 64}` asks it for the same thing). A server that sends no
`usage` in its stream gets its tokens counted as the streamed chunks that carry text.

`bench/peers.py` drives kiln, vLLM, llama.cpp and transformers through these functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

WORDS = ("river mountain light engine garden number story question answer market winter "
         "signal harbor pattern letter forest machine circle window shadow").split()


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    latency: float = 0.0
    error: str = ""


def make_prompts(n: int, seed: int, min_words: int, max_words: int, prefix: str = "") -> list[str]:
    """`n` seeded prompts of random words; `prefix` (e.g. a shared system prompt) leads each."""
    rng = random.Random(seed)
    return [prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def make_prefix(n_words: int, seed: int) -> str:
    """A seeded block of `n_words` words ending in a blank line: the shared part of prompts."""
    if n_words <= 0:
        return ""
    rng = random.Random(f"prefix-{seed}")
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n\n"


def request_body(prompt: str, max_tokens: int, model: str | None, extra_body: dict | None = None) -> dict:
    """The streaming /v1/completions body: greedy, EOS ignored, usage asked for; `extra_body`
    keys are merged in and keys set to None removed."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    for key, value in (extra_body or {}).items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


async def one_request(session: aiohttp.ClientSession, url: str, model: str | None, prompt: str,
                      max_tokens: int, api_key: str | None, extra_body: dict | None = None) -> Result:
    body = request_body(prompt, max_tokens, model, extra_body)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    last = None
    res = Result(ok=False)
    text_chunks = 0
    usage_seen = False
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}"
                await r.read()
                return res
            async for line in r.content:  # the stream line by line: `data: {...}` events
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    text_chunks += 1
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    usage_seen = True
                    res.tokens = chunk["usage"]["completion_tokens"]
        if not usage_seen:  # e.g. llama-cpp-python: one streamed chunk per token
            res.tokens = text_chunks
        res.latency = time.perf_counter() - start
        res.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        res.error = type(exc).__name__
    return res


def client_session(connections: int, timeout: float = 600.0) -> aiohttp.ClientSession:
    """The load generator's HTTP client. aiohttp, as vLLM's benchmark_serving uses: on a 2-core
    host the client shares the cores with the server under test, and its CPU per streamed
    token is about half of httpx's (bench/RESULTS.md)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=timeout))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def run_load(url: str, model: str | None, prompts: list[str], max_tokens: int,
                   concurrency: int | None, rate: float | None, seed: int, api_key: str | None,
                   extra_body: dict | None = None) -> dict:
    async with client_session(max(concurrency or 256, 8)) as client:
        start = time.perf_counter()
        if concurrency:
            queue = list(enumerate(prompts))
            results: list[Result] = []

            async def worker() -> None:
                while queue:
                    _, p = queue.pop(0)
                    results.append(await one_request(client, url, model, p, max_tokens, api_key, extra_body))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(one_request(client, url, model, p, max_tokens, api_key,
                                                             extra_body)))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency, "rate": rate, "requests": len(results), "ok": len(ok),
        "errors": len(results) - len(ok), "error_kinds": sorted({r.error for r in results if not r.ok}),
        "output_tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50": pct(ttfts, 50), "ttft_p90": pct(ttfts, 90), "ttft_p99": pct(ttfts, 99),
        "itl_p50": pct(itls, 50), "itl_p90": pct(itls, 90), "itl_p99": pct(itls, 99),
        "latency_mean": statistics.mean(r.latency for r in ok) if ok else float("nan"),
        "tokens_per_request_min": min((r.tokens for r in ok), default=0),
        "tokens_per_request_max": max((r.tokens for r in ok), default=0),
    }


def start_kiln(port: int, extra: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start `kiln serve`; its output goes to `log` (default bench/results/kiln-PORT.log)."""
    log = log or Path(__file__).parent / "results" / f"kiln-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--port", str(port), "--grpc-port", "0",
                                 *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("kiln serve did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default=None, help="the 'model' field to send [default: none]")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="8", help="comma-separated fixed concurrencies")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrival rate (requests/s) instead of concurrency")
    ap.add_argument("--requests", type=int, default=0, help="requests per run [default: 4 x concurrency, at least 16]")
    ap.add_argument("--prompt-words", default="20,200", help="prompt length range in words (min,max)")
    ap.add_argument("--shared-prefix-words", type=int, default=0,
                    help="lead every prompt with the same seeded block of this many words [default: 0]")
    ap.add_argument("--extra-body", default=None,
                    help="JSON object merged into every request body; null values remove keys")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-kiln", action="store_true", help="start `kiln serve` on --port for the run")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--kiln-args", default="", help="extra arguments for `kiln serve`")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.prompt_words.split(","))
    prefix = make_prefix(args.shared_prefix_words, args.seed)
    extra_body = json.loads(args.extra_body) if args.extra_body else None
    proc = None
    if args.start_kiln:
        proc = start_kiln(args.port, args.kiln_args.split())
        args.url = f"http://127.0.0.1:{args.port}"
    runs = []
    try:
        levels = [None] if args.rate else [int(c) for c in args.concurrency.split(",")]
        for c in levels:
            n = args.requests or max(16, 4 * (c or 4))
            prompts = make_prompts(n, args.seed, lo, hi, prefix)
            r = asyncio.run(run_load(args.url, args.model, prompts, args.max_tokens, c, args.rate, args.seed,
                                     args.api_key, extra_body))
            runs.append(r)
            label = f"concurrency {c}" if c else f"rate {args.rate}/s"
            print(f"{label:>16}: {r['tokens_per_s']:7.1f} tok/s  TTFT p50/p90/p99 "
                  f"{r['ttft_p50'] * 1e3:6.0f}/{r['ttft_p90'] * 1e3:6.0f}/{r['ttft_p99'] * 1e3:6.0f} ms  "
                  f"ITL p50/p90/p99 {r['itl_p50'] * 1e3:5.0f}/{r['itl_p90'] * 1e3:5.0f}/{r['itl_p99'] * 1e3:5.0f} ms  "
                  f"ok {r['ok']}/{r['requests']}" + (f"  errors {r['error_kinds']}" if r["errors"] else ""), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "runs": runs}, indent=2))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
