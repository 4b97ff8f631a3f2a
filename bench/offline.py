"""Offline throughput: kiln's engine vs transformers generate() on one seeded workload,
both in the same dtype (--dtype).

Workload: N requests (default 64), prompt lengths uniform in [32, 512] tokens, 128 new
tokens each, greedy, EOS ignored. Prints tokens/s for kiln (all requests submitted at once,
continuous batching), for transformers one request at a time, and for transformers in padded
static batches; plus, for kiln, how a pure-decode step at 32 running sequences splits between
the model forward and everything else (scheduling, input assembly, sampling, detokenizing).

    python bench/offline.py                      # the full comparison
    python bench/offline.py --skip-hf            # kiln only
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from kiln.config import EngineConfig
from kiln.runtime.engine import Engine
from kiln.runtime.request import Request, SamplingParams


def make_workload(n: int, min_len: int, max_len: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ordinary tokens only (ids below 100 are SmolLM2's special and byte tokens).
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def bench_kiln(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in out)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_decode_split(engine: Engine, prompts: list[list[int]], batch: int, steps: int) -> dict:
    """Run `batch` requests; once all are decoding, time `steps` pure-decode steps."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True)
    for i, p in enumerate(prompts[:batch]):
        engine.add_request(Request(f"split-{i}", p, params))
    forward, total = [], []
    while engine.has_work and len(total) < steps:
        engine.step()
        t = engine.last_step
        if t is not None and t.num_decode == t.num_seqs == batch:
            forward.append(t.forward_seconds)
            total.append(t.total_seconds)
    for i in range(batch):
        engine.abort(f"split-{i}")
    f, s = statistics.median(forward), statistics.median(total)
    return {"batch": batch, "steps": len(total), "step_ms": s * 1e3, "forward_ms": f * 1e3,
            "other_ms": (s - f) * 1e3, "other_share": (s - f) / s}


def bench_hf(model_path: Path, prompts: list[list[int]], new_tokens: int, batch_size: int,
             dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # run past EOS, like ignore_eos
    model.generation_config.pad_token_id = 0
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
            tokens += (out.shape[1] - width) * len(chunk)
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "requests": len(prompts), "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--hf-single-requests", type=int, default=8,
                    help="transformers one-at-a-time runs on the first N requests only (it is slow); "
                         "its tokens/s is a rate, comparable as such")
    ap.add_argument("--hf-batch-sizes", default="8,16,32", help="padded static batch sizes to try")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--split-batch", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    engine = Engine(EngineConfig(dtype=args.dtype, kv_cache_bytes=4 << 30, max_num_seqs=args.max_num_seqs,
                                 max_num_batched_tokens=args.max_num_batched_tokens))
    prompts = make_workload(args.requests, args.min_prompt, args.max_prompt, args.seed,
                            engine.model_config.vocab_size)
    results: dict = {"command": " ".join(["python"] + sys.argv), "threads": torch.get_num_threads(),
                     "cpu": platform.processor() or platform.machine(), "dtype": args.dtype}
    results["kiln"] = bench_kiln(engine, prompts, args.new_tokens)
    print(f"kiln ({args.dtype}, continuous batching): {results['kiln']['tokens_per_s']:.1f} tokens/s "
          f"({results['kiln']['tokens']} tokens in {results['kiln']['seconds']:.1f} s)", flush=True)
    split = bench_decode_split(engine, prompts, args.split_batch, steps=24)
    results["kiln_decode_split"] = split
    print(f"kiln decode step at {split['batch']} seqs: {split['step_ms']:.1f} ms = forward "
          f"{split['forward_ms']:.1f} ms + other {split['other_ms']:.1f} ms ({100 * split['other_share']:.1f}% outside the forward)",
          flush=True)
    if not args.skip_hf:
        single = bench_hf(engine.model_path, prompts[:args.hf_single_requests], args.new_tokens, 1,
                          engine.config.torch_dtype)
        results["hf_single"] = single
        print(f"transformers one at a time ({single['requests']} requests): {single['tokens_per_s']:.1f} tokens/s", flush=True)
        best = None
        for bs in [int(x) for x in args.hf_batch_sizes.split(",") if x]:
            r = bench_hf(engine.model_path, prompts, args.new_tokens, bs, engine.config.torch_dtype)
            results[f"hf_batch_{bs}"] = r
            print(f"transformers static batches of {bs}: {r['tokens_per_s']:.1f} tokens/s", flush=True)
            best = r if best is None or r["tokens_per_s"] > best["tokens_per_s"] else best
        k = results["kiln"]["tokens_per_s"]
        print(f"kiln / transformers one-at-a-time: {k / single['tokens_per_s']:.2f}x; "
              f"kiln / best static batch ({best['batch_size']}): {k / best['tokens_per_s']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
