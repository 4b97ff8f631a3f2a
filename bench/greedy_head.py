"""Greedy decoding's LM head on the CPU: the full bf16 head (gemv_bf16 writing [rows, vocab]
logits, then the row argmax) against the int8 screen (kiln/kernels/cpu/greedy_head.cpp: the same
tokens, reading half the bytes plus a few recomputed blocks), on the default model's head and its
own final hidden states (from prompts of random words, or of random token ids, which leave the
model unsure: flat logits, more blocks to recompute), at several row counts. Each time is the best and the median of --passes
calls, with a 300 MB buffer touched between calls so the head's weights come from memory, as in
a decode step. Also prints how many 16-logit blocks a row needed recomputed.

    python bench/greedy_head.py
    python bench/greedy_head.py --prompts tokens --rows 1,32,64 --passes 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import serving  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,16,24,32,48,64")
    ap.add_argument("--passes", type=int, default=11)
    ap.add_argument("--prompts", choices=("words", "tokens"), default="words",
                    help="random English words (as bench/serving.py) or random token ids [default words]")
    args = ap.parse_args()

    from kiln.config import EngineConfig
    from kiln.kernels import cpu_ops
    from kiln.runtime.engine import Engine
    from kiln.runtime.request import Request, SamplingParams

    engine = Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=256 << 20))
    head = engine.model.lm_head
    if head.greedy is None:
        print("the int8 screen is off here (no AMX-INT8, no bf16 gemv copy, or KILN_CPU_GREEDY_HEAD=0)")
        return 1
    model, seen = engine.model, []
    full_head = model.head

    def record(h, greedy=False):
        seen.append(h.detach().clone())
        return full_head(h, greedy)

    model.head = record  # the hidden states of real greedy decodes
    g = torch.Generator().manual_seed(0)
    words = serving.make_prompts(64, 0, 20, 200)
    for i in range(64):
        if args.prompts == "tokens":
            prompt = torch.randint(100, 49000, (20 + 3 * i,), generator=g).tolist()
        else:
            prompt = engine.tokenizer.encode(words[i])
        engine.add_request(Request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)))
    while engine.has_work:
        engine.step()
    xs = torch.cat(seen)
    flush = torch.empty(300 << 20, dtype=torch.uint8)

    def timed(fn) -> tuple[float, float]:
        times = []
        for _ in range(args.passes):
            flush.add_(1)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times), statistics.median(times)

    print(f"{torch.get_num_threads()} threads, prompts of random {args.prompts}; the default model's head ({head.gemv.shape[0] * 16} x "
          f"{head.gemv.shape[1] * 2} bf16, {head.gemv.numel() * 2 / 1e6:.1f} MB; int8 copy "
          f"{head.greedy.q.numel() / 1e6:.1f} MB); ms a call, best / median of {args.passes}")
    print("| rows | full head + argmax | int8 screen | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        x = xs[len(xs) // 3:len(xs) // 3 + rows]
        want = cpu_ops.argmax_rows(cpu_ops.gemv_bf16(x, head.gemv))
        got = cpu_ops.greedy_head_bf16(x, head.gemv, head.greedy)
        assert torch.equal(got, want), "the screen and the full head disagree"
        full = timed(lambda: cpu_ops.argmax_rows(cpu_ops.gemv_bf16(x, head.gemv)))
        screen = timed(lambda: cpu_ops.greedy_head_bf16(x, head.gemv, head.greedy))
        print(f"| {rows} | {full[0] * 1e3:.2f} / {full[1] * 1e3:.2f} | {screen[0] * 1e3:.2f} / "
              f"{screen[1] * 1e3:.2f} | {full[1] / screen[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
