"""Where a decode step's time goes: N sequences decoding together in kiln's engine, the
step split into model forward vs the rest (scheduling, sampling, detokenization), and a
torch.profiler table of the forward's operators (self CPU time, top rows).

    python bench/profile_decode.py --dtype bfloat16 --seqs 32
    python bench/profile_decode.py --dtype float32 --seqs 1 --top 15
    python bench/profile_decode.py --seqs 1 --model /tmp/gq/gptq-def --quantize int8   # a GPTQ folder, int8 LM head
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--seqs", type=int, default=32, help="sequences decoding together [default 32]")
    ap.add_argument("--prompt-tokens", type=int, default=112, help="prompt length of each sequence [default 112]")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed [default 20]")
    ap.add_argument("--model", default="default", help="model folder or .gguf [default: the default model]")
    ap.add_argument("--quantize", default=None, help="load-time quantization, as `kiln serve --quantize`")
    ap.add_argument("--top", type=int, default=20, help="operator rows in the profile table [default 20]")
    args = ap.parse_args()

    from kiln.config import EngineConfig
    from kiln.runtime.engine import Engine
    from kiln.runtime.request import Request, SamplingParams

    engine = Engine(EngineConfig(model=args.model, quantize=args.quantize, dtype=args.dtype, kv_cache_bytes=1 << 30, max_num_seqs=max(64, args.seqs)))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps * 2 + 8, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(Request(f"p{i}", torch.randint(100, 49000, (args.prompt_tokens,), generator=g).tolist(), params))
    while True:  # prefill until every sequence decodes
        engine.step()
        t = engine.last_step
        if t is not None and t.num_decode == t.num_seqs == args.seqs:
            break
    for _ in range(3):  # warm-up decode steps
        engine.step()

    forward, total = [], []
    for _ in range(args.steps):
        engine.step()
        forward.append(engine.last_step.forward_seconds)
        total.append(engine.last_step.total_seconds)
    f, t = statistics.median(forward) * 1e3, statistics.median(total) * 1e3
    print(f"{args.seqs} sequences, {args.dtype}, {torch.get_num_threads()} threads: decode step {t:.1f} ms "
          f"(forward {f:.1f} ms, rest {t - f:.1f} ms) -> {args.seqs / (t / 1e3):.0f} tokens/s")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
