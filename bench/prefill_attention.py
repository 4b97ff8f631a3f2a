"""Prefill attention on the CPU: kiln's C++ kernel (kiln/kernels/cpu/paged_prefill.cpp, AMX
tiles, every prefill of a step in one call) against what the CPU backend ran before it, one
torch SDPA call per sequence (a group mask for short fresh prompts, SDPA's causal GQA path from
256 tokens, a gather of the cached context plus a mask behind a prefix). One layer of the
default model's attention shape (9 query heads, 3 KV heads, head size 64), bfloat16, times per
call, best of --passes.

    python bench/prefill_attention.py
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

BS = 16
HKV, G, D = 3, 3, 64

CASES = {
    "18 fresh prompts of 113 tokens (a 2,048-token chunk)": [(113, 113)] * 18,
    "8 fresh prompts of 256 tokens": [(256, 256)] * 8,
    "1 fresh prompt of 2,000 tokens": [(2000, 2000)],
    "8 prompts of 40 tokens behind a cached 1,000-token prefix": [(40, 1040)] * 8,
}


def build(cases: list[tuple[int, int]], g: torch.Generator):
    """q for every new token, a cache holding every context in consecutive blocks, and the
    kernel's per-prefill tensors."""
    nblocks = [-(-c // BS) for _, c in cases]
    k = torch.randn(sum(nblocks) * BS, HKV, D, generator=g).bfloat16()
    v = torch.randn(sum(nblocks) * BS, HKV, D, generator=g).bfloat16()
    q = torch.randn(sum(n for n, _ in cases), HKV * G, D, generator=g).bfloat16()
    tables = torch.zeros(len(cases), max(nblocks), dtype=torch.long)
    starts, first_block, start = [], 0, 0
    for i, ((n, _), nb) in enumerate(zip(cases, nblocks)):
        tables[i, :nb] = torch.arange(first_block, first_block + nb)
        first_block += nb
        starts.append(start)
        start += n
    return q, k, v, tables, starts


def sdpa_per_sequence(q, k, v, tables, starts, cases, out):
    """The CPU backend's SDPA path (kiln/runtime/backends/cpu.py before the kernel)."""
    scale = D ** -0.5
    for i, ((n, c), s) in enumerate(zip(cases, starts)):
        slots = (tables[i].unsqueeze(-1) * BS + torch.arange(BS)).flatten()[:c]
        if n == c and n >= 256:
            kk, vv = k.index_select(0, slots), v.index_select(0, slots)
            o = F.scaled_dot_product_attention(
                q[s:s + n].transpose(0, 1).unsqueeze(0), kk.transpose(0, 1).unsqueeze(0),
                vv.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True)
            out[s:s + n] = o[0].transpose(0, 1).view(n, HKV, G, D)
            continue
        qp = q[s:s + n].view(n, HKV, G, D).transpose(0, 1).reshape(1, HKV, n * G, D)
        kp = k.view(-1, HKV * D).index_select(0, slots).view(-1, HKV, D).transpose(0, 1)
        vp = v.view(-1, HKV * D).index_select(0, slots).view(-1, HKV, D).transpose(0, 1)
        q_pos = torch.arange(n).unsqueeze(1) + (c - n)
        mask = (torch.arange(c).unsqueeze(0) <= q_pos).repeat_interleave(G, dim=0)
        o = F.scaled_dot_product_attention(qp, kp.unsqueeze(0), vp.unsqueeze(0), attn_mask=mask, scale=scale)
        out[s:s + n] = o.view(HKV, n, G, D).transpose(0, 1)


def best_of(fn, passes: int, reps: int) -> float:
    fn()
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()

    from kiln.kernels import cpu_ops
    from kiln.runtime.models.loader import cache_dir

    if not cpu_ops.load(cache_dir()) or not cpu_ops.paged_prefill_supported(D, G):
        print("kiln's prefill kernel is not available here (no compiler, or a CPU without AMX-BF16)")
        return 0
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; one layer (9 query heads, 3 KV heads, head size 64, bf16); "
          f"ms a call, best of {args.passes} passes")
    print("| case | kiln kernel ms | per-sequence SDPA ms | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, cases in CASES.items():
        q, k, v, tables, starts = build(cases, g)
        out = torch.empty(q.shape[0], HKV, G, D, dtype=torch.bfloat16)
        lens = [torch.tensor(x, dtype=torch.long) for x in (starts, [n for n, _ in cases], [c for _, c in cases])]
        mine = best_of(lambda: cpu_ops.paged_prefill(out, q, k, v, tables, *lens, BS, D ** -0.5), args.passes, args.reps)
        ref_out = torch.empty_like(out)
        theirs = best_of(lambda: sdpa_per_sequence(q, k, v, tables, starts, cases, ref_out), args.passes, args.reps)
        err = (out.float() - ref_out.float()).abs().max().item()
        assert err < 3e-2, f"{name}: kernel and SDPA differ by {err}"
        print(f"| {name} | {mine * 1e3:.2f} | {theirs * 1e3:.2f} | {theirs / mine:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
