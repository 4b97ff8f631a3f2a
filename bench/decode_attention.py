"""Decode attention on the CPU: kiln's C++ kernel (kiln/kernels/cpu/paged_decode.cpp) at the
default model's attention shape (9 query heads, 3 KV heads, head size 64, bfloat16), for
several batch sizes and context lengths. Each case gets 30 distinct caches, one per layer, as
a decode step reads them (so the caches come from memory, not from a cache level a single
layer would fit in), with blocks in shuffled order; the time is per layer, best of --passes
passes over the 30. GB/s is the K and V bytes read over that time. `--layers 1` reads one
layer's cache over and over instead: where it fits in L3 (64 x 155 positions is 7.6 MB), the
time without memory's share, to set against the first.

    python bench/decode_attention.py
    python bench/decode_attention.py --cases 64x155,8x600
    python bench/decode_attention.py --cases 64x155 --layers 1 --passes 30
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

BS = 16
HKV, G, D = 3, 3, 64
LAYERS = 30
DEFAULT_CASES = "64x16,64x60,64x125,64x155,64x250,32x155,8x200,8x600,1x200,1x1000"


def build(B: int, L: int, g: torch.Generator, layers: int = LAYERS):
    """q, `layers` layers' K/V caches holding B contexts of L positions in shuffled blocks, tables, lens."""
    blocks = -(-L // BS)
    slots = (B * blocks + 1) * BS
    caches = [(torch.randn(slots, HKV, D, generator=g).bfloat16(), torch.randn(slots, HKV, D, generator=g).bfloat16())
              for _ in range(layers)]
    tables = torch.randperm(B * blocks, generator=g).view(B, blocks).contiguous()
    lens = torch.full((B,), L, dtype=torch.long)
    q = torch.randn(B, HKV, G, D, generator=g).bfloat16()
    return q, caches, tables, lens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"BxL,... sequences x context positions [{DEFAULT_CASES}]")
    ap.add_argument("--passes", type=int, default=10)
    ap.add_argument("--layers", type=int, default=LAYERS,
                    help=f"distinct caches a pass reads, one per layer [default {LAYERS}: from memory, as a decode "
                         "step; 1: one cache again and again, from L2/L3 where it fits]")
    args = ap.parse_args()
    if args.layers < 1 or args.passes < 1:
        ap.error("--layers and --passes must be at least 1")

    from kiln.kernels import cpu_ops
    from kiln.runtime.models.loader import cache_dir

    if not cpu_ops.load(cache_dir()):
        print("kiln's CPU kernels are not available here (no compiler)")
        return 0
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; one layer (9 query heads, 3 KV heads, head size 64, bf16, "
          f"block size {BS}); us a layer, best of {args.passes} passes over {args.layers} layers' caches")
    print("| sequences | positions each | K+V MB a layer | us a layer | GB/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for case in args.cases.split(","):
        B, L = (int(x) for x in case.lower().split("x"))
        q, caches, tables, lens = build(B, L, g, args.layers)
        best = float("inf")
        for _ in range(args.passes):
            start = time.perf_counter()
            for k, v in caches:
                cpu_ops.paged_decode(q, k, v, tables, lens, BS, D ** -0.5)
            best = min(best, (time.perf_counter() - start) / len(caches))
        nbytes = B * L * HKV * D * 2 * 2
        print(f"| {B} | {L} | {nbytes / 1e6:.1f} | {best * 1e6:.0f} | {nbytes / best / 1e9:.1f} |")
        del caches
    return 0


if __name__ == "__main__":
    sys.exit(main())
