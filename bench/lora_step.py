"""In-process A/B of the LoRA compute paths on decode steps: one engine, 32 running requests
over N adapters, and each decode step run with one variant in turn (base model = the LoRA
term switched off; "loop" = each adapter's rows through its own weights; "grouped" = the
slot-batched path, its decode rows through kiln's C++ kernel where it built; "grouped-torch" =
the same in torch ops), so drift from other work on a shared machine hits every variant alike.
Prints the median decode-step forward time per variant and its cost over base.

    python bench/lora_step.py --rank 64 --adapters 16 --rounds 12
    python bench/lora_step.py --dtype bfloat16 --variants base,grouped-torch,grouped

"loop" is the code before the slot-batched path (it is kept as the reference path), so this
is also a before/after. On a loaded machine use --threads 1: with 2 threads every small op's
parallel region waits for a descheduled thread, which swamps what is measured.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora import TARGET_SETS, write_adapter  # noqa: E402  (bench/lora.py)

from kiln.config import EngineConfig  # noqa: E402
from kiln.runtime.engine import Engine  # noqa: E402
from kiln.runtime.models.loader import ModelConfig, resolve_model  # noqa: E402
from kiln.runtime.request import Request, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--variants", default="base,loop,grouped")
    ap.add_argument("--targets", default="all", choices=tuple(TARGET_SETS), help="projections the adapters cover")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the engine's default)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    cfg = ModelConfig.from_folder(resolve_model("default"))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, cfg.vocab_size) for _ in range(rng.randint(64, 256))] for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        targets = TARGET_SETS[args.targets]
        loras = ",".join(f"a{i}={write_adapter(Path(tmp) / f'a{i}', cfg, args.rank, 1000 * args.rank + i, targets)}"
                         for i in range(args.adapters))
        engine = Engine(EngineConfig(kv_cache_bytes=2 << 30, max_num_seqs=args.requests, loras=loras,
                                     max_loras=max(args.adapters, 1), lora_cache_bytes=8 << 30,
                                     num_threads=args.threads or None, dtype=args.dtype))
    params = SamplingParams(temperature=0.0, max_tokens=len(variants) * args.rounds + 8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(Request(f"r{i}", prompt, params, lora_name=f"a{i % args.adapters}" if args.adapters else None))
    while engine.last_step is None or engine.last_step.num_decode < args.requests:  # prefills
        engine.step()
    context, runner = engine.lora.context, engine.runner
    kernel = context.cpu_kernel
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds + 1):  # the first round warms each path (slot copies) and is dropped
        for v in variants:
            runner.lora_context = None if v == "base" else context
            if v != "base":
                context.mode = "grouped" if v == "grouped-torch" else v
                context.cpu_kernel = kernel and v == "grouped"
            engine.step()
            times[v].append(engine.last_step.forward_seconds)
    runner.lora_context = context
    base = statistics.median(times["base"][1:]) if "base" in times else None
    print(f"decode step forward, {args.requests} rows, {args.adapters} adapters of rank {args.rank} "
          f"(median of {args.rounds})")
    for v in variants:
        med = statistics.median(times[v][1:])
        extra = f"  {med / base - 1:+.1%} over base" if base else ""
        print(f"{v:>8}: {med * 1e3:7.1f} ms{extra}")
    if base and args.adapters > 1:
        print_floor(context.slots, args.adapters, base)


def print_floor(slots, adapters: int, base: float) -> None:
    """The bandwidth floor of the LoRA term: every adapter's A and B are read once per step,
    so no kernel can take less than their bytes over the machine's read bandwidth."""
    nbytes = 0
    for key, ranks in slots.ranks.items():  # the ranks each adapter has for each part
        in_features = slots.a[key].shape[2]
        for s in range(adapters):
            for p, (_, size) in enumerate(slots.parts[key]):
                nbytes += int(ranks[s, p]) * (in_features + size) * slots.a[key].element_size()
    buf = torch.ones((512 << 20) // 4)  # well past the caches
    best = min(_timed(buf.sum) for _ in range(5))
    bandwidth = buf.numel() * 4 / best
    floor = nbytes / bandwidth
    print(f"   floor: {nbytes / 1e6:.0f} MB of adapter weights a step / {bandwidth / 1e9:.1f} GB/s read bandwidth "
          f"= {floor * 1e3:.1f} ms, so the LoRA term costs at least {floor / (base + floor):.0%} of decode throughput")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
