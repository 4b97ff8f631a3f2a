"""Tensor parallelism: tokens/s and per-rank memory for several tensor-parallel sizes.

Each size runs the same seeded workload (N requests, prompt lengths uniform in
[min_len, max_len], `--new-tokens` each, greedy, EOS ignored) through `Engine` with
`tensor_parallel_size=N`, and reports generated tokens/s over the whole run (prefill
included), the median pure-decode step, and per rank its weight bytes and RSS.

The default model is the default model's shape with 12 query heads of 48 dims over 4 KV heads
instead of 9 x 64 over 3 (same hidden size 576, 30 layers, 1536 intermediate, 49152 vocab, tied
embeddings: the same 135M parameters), with seeded random weights, so that 1, 2, 3, 4, 6 and
12 ranks all divide it; `--model default` runs the real default model (sizes 1 and 3).

On CPUs the ranks are processes joined with gloo (threads per rank: cores / N); with CUDA
each rank owns one GPU and the collectives run on NCCL:

    python bench/tp.py                                  # sizes 1,2 on the CPU
    python bench/tp.py --sizes 1,2,4,8 --model /models/llama-3-8b --num-requests 64   # 8 GPUs
    python bench/tp.py --json bench/results/tp.json
    python bench/tp.py --sizes 1 --threads-per-rank 1   # N=1 with as many threads as a rank of N=2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kiln.config import EngineConfig
from kiln.runtime.engine import Engine
from kiln.runtime.parallel import weight_bytes
from kiln.runtime.request import Request, SamplingParams


def synthetic_model(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tp_models import make_llama

    if not (out / "model.safetensors").is_file():
        make_llama(out, heads=12, kv_heads=4, hidden=576, intermediate=1536, layers=30, tie=True, seed=0)
    return out


def workload(n: int, min_len: int, max_len: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def bench(config: EngineConfig, prompts: list[list[int]], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    engine = Engine(config)
    load_s = time.perf_counter() - t0
    try:
        engine.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(Request(f"tp-{i}", p, params))
        decode_steps = []
        tokens = 0
        start = time.perf_counter()
        with torch.inference_mode():
            while engine.has_work:
                tokens += sum(len(o.new_token_ids) for o in engine.step())
                t = engine.last_step
                if t is not None and t.num_decode == t.num_seqs == len(prompts):
                    decode_steps.append(t.total_seconds)
        seconds = time.perf_counter() - start
        if engine.tp is not None:
            ranks = engine.tp.rank_stats()
        else:
            import psutil

            ranks = [{"rank": 0, "pid": os.getpid(), "weight_bytes": weight_bytes(engine.model),
                      "rss_bytes": psutil.Process().memory_info().rss}]
        return {"tensor_parallel_size": config.tensor_parallel_size, "load_seconds": load_s, "tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds,
                "decode_step_ms": 1000 * statistics.median(decode_steps) if decode_steps else None,
                "ranks": ranks}
    finally:
        engine.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder, 'default', or unset: the synthetic 12-head model")
    ap.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, comma-separated [1,2]")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-bytes", default="256M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads-per-rank", type=int, default=None,
                    help="torch threads of every rank [default: CPU cores / N]")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from kiln.config import parse_size

    model = args.model or str(synthetic_model(Path(tempfile.gettempdir()) / "kiln-bench-tp-synthetic"))
    probe = EngineConfig(model=model)
    from kiln.runtime.models.loader import ModelConfig, resolve_model

    vocab = ModelConfig.from_folder(resolve_model(probe.model)).vocab_size
    prompts = workload(args.num_requests, args.min_len, args.max_len, args.seed, vocab)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        config = EngineConfig(model=model, dtype=args.dtype, kv_cache_bytes=parse_size(args.kv_cache_bytes),
                              tensor_parallel_size=size, max_num_seqs=max(64, args.num_requests),
                              num_threads=args.threads_per_rank or max(1, (os.cpu_count() or 1) // size))
        r = bench(config, prompts, args.new_tokens)
        r["threads_per_rank"] = config.num_threads
        results.append(r)
        ranks = ", ".join(f"rank {x['rank']}: weights {x['weight_bytes'] / 2**20:.0f} MiB, RSS {x['rss_bytes'] / 2**20:.0f} MiB"
                          for x in r["ranks"])
        step = f"{r['decode_step_ms']:.1f} ms" if r["decode_step_ms"] else "-"
        print(f"\nN={size} ({config.num_threads} threads per rank): {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens in {r['seconds']:.1f} s), "
              f"decode step @{args.num_requests} {step}, load {r['load_seconds']:.1f} s; {ranks}", flush=True)
    if args.json:
        meta = {"command": " ".join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "cuda_devices": torch.cuda.device_count(), "torch": torch.__version__,
                "model": model, "workload": vars(args)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
