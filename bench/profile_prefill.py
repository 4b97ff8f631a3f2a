"""Where prefill time goes: N fresh prompts through kiln's engine (one output token each, so the
steps are the 2,048-token prefill chunks), prompt tokens per second of the whole steps, then a
torch.profiler table of the operators of a few more chunks (self CPU time, top rows).

    python bench/profile_prefill.py
    python bench/profile_prefill.py --prompt-tokens 2000 --prompts 8
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--prompt-tokens", type=int, default=113, help="tokens per prompt [default 113]")
    ap.add_argument("--prompts", type=int, default=100, help="prompts timed [default 100]")
    ap.add_argument("--top", type=int, default=15, help="operator rows in the profile table [default 15]")
    args = ap.parse_args()

    from kiln.config import EngineConfig
    from kiln.runtime.engine import Engine
    from kiln.runtime.request import Request, SamplingParams

    engine = Engine(EngineConfig(dtype=args.dtype, kv_cache_bytes=2 << 30, max_num_seqs=256, max_model_len=4096))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    count = 0

    def run(n: int) -> tuple[int, float]:
        nonlocal count
        for _ in range(n):
            ids = torch.randint(100, 49000, (args.prompt_tokens,), generator=g).tolist()
            engine.add_request(Request(f"p{count}", ids, params))
            count += 1
        tokens, seconds = 0, 0.0
        while engine.has_work:
            engine.step()
            tokens += engine.last_step.num_tokens
            seconds += engine.last_step.total_seconds
        return tokens, seconds

    run(max(4, args.prompts // 3))  # warm-up
    tokens, seconds = run(args.prompts)
    print(f"{args.prompts} prompts of {args.prompt_tokens} tokens, {args.dtype}, {torch.get_num_threads()} threads: "
          f"{tokens} prompt tokens in {seconds:.2f} s of steps -> {tokens / seconds:.0f} tokens/s")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(max(1, 4096 // args.prompt_tokens))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
