"""A bounded soak of `kiln serve`: mixed traffic for a set number of minutes — streaming and
not, chat and completions, random client cancellations, bad requests among good ones, LoRA
adapters (one loaded at start, one hot-loaded and unloaded every few seconds while requests
for it flow) — then checks that every KV block is free again and that resident memory is back
near its level after warm-up.

    python bench/soak.py --minutes 10 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serving import make_prompts, start_kiln  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


BAD_BODIES = [
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "temperature": -1},
    {"max_tokens": 4},
    {"prompt": "x", "model": "no-such-model"},
    {"prompt": "hello " * 9000, "max_tokens": 4},
]


ADAPTERS = [None, None, "steady", "hot"]  # what requests ask for: base twice as often


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, prompts: list[str], counts: Counter,
              adapters: bool) -> None:
    kind = rng.random()
    if kind < 0.08:
        r = await client.post(f"{url}/v1/completions", json=rng.choice(BAD_BODIES))
        counts["bad_refused" if 400 <= r.status_code < 500 else f"bad_unexpected_{r.status_code}"] += 1
        return
    chat = rng.random() < 0.4
    stream = rng.random() < 0.6
    cancel = stream and rng.random() < 0.25
    params = {"max_tokens": rng.randint(4, 96), "temperature": rng.choice([0.0, 0.7, 1.0]),
              "top_p": rng.choice([1.0, 0.9]), "stream": stream}
    if rng.random() < 0.3:
        params["seed"] = rng.randint(0, 1000)
    if rng.random() < 0.2:
        params["stop"] = ["\n\n", " the"]
    model = rng.choice(ADAPTERS) if adapters else None
    if model:
        params["model"] = model
    prompt = rng.choice(prompts)
    path, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **params})
                  if chat else ("/v1/completions", {"prompt": prompt, **params}))
    try:
        if not stream:
            r = await client.post(url + path, json=body)
            counts["completed" if r.status_code == 200 else _refusal(r.status_code, model)] += 1
            return
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                if r.status_code == 404 and model == "hot":
                    counts["hot_adapter_unloaded_404"] += 1
                    return
                counts[f"failed_{r.status_code}"] += 1
                return
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if cancel and chunks >= 3:
                        counts["cancelled"] += 1
                        return  # leaving the block closes the connection mid-stream
            counts["completed"] += 1
    except httpx.HTTPError as exc:
        counts[f"failed_{type(exc).__name__}"] += 1


def _refusal(status: int, model: str | None) -> str:
    # "hot" is unloaded now and then on purpose: a 404 for it is the expected answer.
    return "hot_adapter_unloaded_404" if status == 404 and model == "hot" else f"failed_{status}"


async def swap_hot_adapter(client: httpx.AsyncClient, url: str, path: Path | None, stop_at: float,
                           counts: Counter) -> None:
    """Load and unload the "hot" adapter every few seconds while traffic flows."""
    if path is None:
        return
    loaded = False
    while time.monotonic() < stop_at:
        if loaded:
            r = await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot"})
        else:
            r = await client.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(path)})
        if r.status_code == 200:
            counts["adapter_swaps"] += 1
            loaded = not loaded
        else:
            counts[f"failed_swap_{r.status_code}"] += 1
        await asyncio.sleep(3.0)
    if loaded:
        await client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "hot"})


async def soak(url: str, minutes: float, concurrency: int, seed: int, hot: Path | None = None) -> Counter:
    prompts = make_prompts(200, seed, 5, 150)
    counts: Counter = Counter()
    stop_at = time.monotonic() + minutes * 60
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        async def worker(i: int) -> None:
            wrng = random.Random(seed * 1000 + i)
            while time.monotonic() < stop_at:
                await one(client, url, wrng, prompts, counts, hot is not None)

        await asyncio.gather(swap_hot_adapter(client, url, hot, stop_at, counts),
                             *(worker(i) for i in range(concurrency)))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--kiln-args", default="--kv-cache-bytes 512M")
    ap.add_argument("--warmup-minutes", type=float, default=2.0,
                    help="the same traffic before the RSS baseline is taken, so allocator high-water marks "
                         "(the largest batches, every adapter loaded once) are reached first")
    ap.add_argument("--rss-tolerance", type=float, default=0.15, help="allowed RSS growth after warm-up")
    ap.add_argument("--no-adapters", action="store_true", help="base model only, no LoRA traffic")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    adapter_dir = Path(tempfile.mkdtemp(prefix="kiln-soak-adapters-"))
    kiln_args = args.kiln_args.split()
    hot = None
    if not args.no_adapters:
        from lora import write_adapter

        from kiln.runtime.models.loader import ModelConfig, resolve_model

        cfg = ModelConfig.from_folder(resolve_model("default"))
        steady = write_adapter(adapter_dir / "steady", cfg, rank=8, seed=1)
        hot = write_adapter(adapter_dir / "hot", cfg, rank=16, seed=2)
        kiln_args += ["--lora", f"steady={steady}", "--lora-root", str(adapter_dir)]
    proc = start_kiln(args.port, kiln_args)
    url = f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(soak(url, args.warmup_minutes, args.concurrency, args.seed + 1, hot))
        time.sleep(2)
        rss_warm = rss_mib(proc.pid)
        start = time.monotonic()
        counts = asyncio.run(soak(url, args.minutes, args.concurrency, args.seed, hot))
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = httpx.get(f"{url}/metrics").text
            if metric(text, "kiln_num_requests_running") == 0 and metric(text, "kiln_num_requests_waiting") == 0:
                break
            time.sleep(0.5)
        time.sleep(2)
        rss_end = rss_mib(proc.pid)
        text = httpx.get(f"{url}/metrics").text
        free, total = metric(text, "kiln_kv_cache_blocks_free"), metric(text, "kiln_kv_cache_blocks_total")
        healthy = httpx.get(f"{url}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(adapter_dir, ignore_errors=True)
    report = {
        "minutes": elapsed / 60, "concurrency": args.concurrency, "counts": dict(counts),
        "kv_blocks_free": free, "kv_blocks_total": total, "rss_after_warmup_mib": rss_warm,
        "rss_end_mib": rss_end, "healthy_at_end": healthy,
    }
    print(json.dumps(report, indent=2))
    failures = [k for k in counts if k.startswith(("failed", "bad_unexpected"))]
    ok = (free == total and healthy and not failures and rss_end <= rss_warm * (1 + args.rss_tolerance))
    print("SOAK PASSED" if ok else "SOAK FAILED")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
