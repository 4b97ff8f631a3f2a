"""The harness's concurrent workload replayed on the engine alone (no HTTP): N requests, at
most --in-flight at a time (a new one is added as one finishes), prompts of ~113 random tokens,
--new-tokens greedy tokens each, EOS ignored. Prints output tokens/s and how the steps split
into pure-decode, pure-prefill and mixed steps, so a served figure (bench/peers.py) can be set
against what the engine alone does with the same shape of work.

    python bench/engine_replay.py --in-flight 32
    python bench/engine_replay.py --in-flight 64 --requests 128
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="default: 2 x --in-flight (as the harness)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args()

    from kiln.config import EngineConfig
    from kiln.runtime.engine import Engine
    from kiln.runtime.request import Request, SamplingParams

    engine = Engine(EngineConfig(dtype=args.dtype, kv_cache_bytes=2 << 30, max_num_seqs=max(64, args.in_flight),
                                 max_model_len=4096))
    g = torch.Generator().manual_seed(0)
    n = args.requests or 2 * args.in_flight
    prompts = [torch.randint(100, 49000, (100 + int(torch.randint(0, 27, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    for i in range(4):  # warm-up, uncounted
        engine.add_request(Request(f"warm{i}", prompts[i][:20], params))
    while engine.has_work:
        engine.step()

    pending = collections.deque(range(n))
    for _ in range(min(args.in_flight, n)):
        i = pending.popleft()
        engine.add_request(Request(f"r{i}", prompts[i], params))
    steps, seconds = collections.Counter(), collections.Counter()
    tokens = 0
    start = time.perf_counter()
    while engine.has_work:
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        last = engine.last_step
        kind = "decode" if last.num_decode == last.num_seqs else "prefill" if last.num_decode == 0 else "mixed"
        steps[kind] += 1
        seconds[kind] += dt
        for out in outputs:
            tokens += len(out.new_token_ids)
            if out.finished and pending:
                i = pending.popleft()
                engine.add_request(Request(f"r{i}", prompts[i], params))
    elapsed = time.perf_counter() - start
    print(f"{n} requests, {args.in_flight} in flight, {args.dtype}: {tokens} tokens in {elapsed:.2f} s "
          f"= {tokens / elapsed:.0f} tok/s")
    for kind in ("prefill", "mixed", "decode"):
        if steps[kind]:
            print(f"  {kind}: {steps[kind]} steps, {seconds[kind]:.2f} s, {1e3 * seconds[kind] / steps[kind]:.1f} ms a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
