"""The one-row bfloat16 linear (kiln/kernels/cpu/gemv.cpp) against oneDNN's prepacked linear
(what kiln runs otherwise), at the default model's four decode shapes and 1, 2 and 4 rows.
Each shape is timed over 30 distinct weights (one per layer, as a decode step reads them), best
of 5 passes; GB/s is weight bytes over time.

    python bench/gemv.py
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

SHAPES = [(960, 576, "qkv"), (576, 576, "o"), (3072, 576, "gate_up"), (576, 1536, "down")]


def _best(fn, xs, weights, passes: int) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for w in weights:
            fn(xs, w)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()

    from kiln.kernels import cpu_ops
    from kiln.runtime.models.loader import cache_dir

    if not cpu_ops.load(cache_dir()) or not cpu_ops.gemv_bf16_supported():
        print("kiln's one-row kernel is not available here (no compiler or no AVX512-BF16)")
        return 0
    onednn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; per call, best of {args.passes} passes over {args.layers} weights")
    print("| rows | linear | N x K | kiln gemv us | GB/s | oneDNN us | GB/s |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        totals = [0.0, 0.0]
        for n, k, name in SHAPES:
            dense = [torch.randn(n, k, generator=g).bfloat16() for _ in range(args.layers)]
            mine = [cpu_ops.pack_gemv_bf16(w) for w in dense]
            theirs = [torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in dense]
            x = torch.randn(rows, k, generator=g).bfloat16()
            # the two agree up to bf16 rounding of the outputs
            a, b = cpu_ops.gemv_bf16(x, mine[0]), onednn(x, theirs[0])
            assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
            t_mine = _best(cpu_ops.gemv_bf16, x, mine, args.passes) / args.layers
            t_theirs = _best(onednn, x, theirs, args.passes) / args.layers
            totals[0] += t_mine
            totals[1] += t_theirs
            gb = n * k * 2 / 1e9
            print(f"| {rows} | {name} | {n} x {k} | {t_mine * 1e6:.1f} | {gb / t_mine:.1f} | "
                  f"{t_theirs * 1e6:.1f} | {gb / t_theirs:.1f} |")
        print(f"| {rows} | a layer | | **{totals[0] * 1e6:.0f}** | | **{totals[1] * 1e6:.0f}** | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
