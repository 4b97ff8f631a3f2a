"""Kernel benchmark on a CUDA device: kiln's Triton kernels against torch's
scaled_dot_product_attention and flash-attn (when installed), at realistic sizes.

Each case is timed with CUDA events after warm-up (the mean of --iters calls) and reported as
achieved TFLOP/s and TB/s, computed from the roofline floor of the call (the FLOPs it must
do and the bytes it must move at least; see bench/RESULTS.md), next to the device's measured
ceilings: a bf16 8192^3 matmul and a device-to-device copy.

    python bench/kernels.py                   # everything, bf16
    python bench/kernels.py --only decode --json out.json

On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

BYTES = 2  # bf16 / fp16


def timeit(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean seconds per call, CUDA events around `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def ceilings() -> dict[str, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timeit(lambda: a @ b, 10)
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    c = timeit(lambda: dst.copy_(src), 10)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"tflops": 2 * 8192**3 / t / 1e12, "tbps": 2 * 2 * 1024**3 / c / 1e12}


def paged_cache(batch: int, ctx: int, hkv: int, d: int, block: int, dtype: torch.dtype):
    """A cache holding `batch` contexts of `ctx` tokens in shuffled blocks, plus the same
    K/V laid out contiguously [B, Hkv, L, D] for the dense baselines."""
    nblk = -(-ctx // block)
    k = torch.randn(batch, ctx, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    perm = torch.randperm(batch * nblk, device="cuda")
    tables = perm.view(batch, nblk).to(torch.int32)
    kc = torch.zeros(batch * nblk * block, hkv, d, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    pos = torch.arange(ctx, device="cuda")
    slots = (tables.long()[:, pos // block] * block + pos % block).flatten()
    kc[slots] = k.flatten(0, 1)
    vc[slots] = v.flatten(0, 1)
    return kc, vc, tables, k.transpose(1, 2), v.transpose(1, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def flash():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def bench_prefill(args, rows: list[dict]) -> None:
    from kiln.kernels.prefill_attention import prefill_attention

    fa = flash()
    d = 128
    for hq, hkv in ((32, 8), (64, 8)):
        for batch, length in ((1, 512), (8, 512), (1, 2048), (4, 4096), (1, 8192), (1, 16384), (1, 32768)):
            kc, vc, tables, kd, vd = paged_cache(batch, length, hkv, d, 16, torch.bfloat16)
            q = torch.randn(batch * length, hq, d, device="cuda", dtype=torch.bfloat16)
            cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * length
            ctx = torch.full((batch,), length, device="cuda", dtype=torch.int32)
            flops = 2 * batch * hq * d * length * length  # causal: half of 4·L²·D per head
            nbytes = BYTES * batch * length * d * (2 * hq + 2 * hkv)  # read Q, K, V; write O
            qd = q.view(batch, length, hq, d).transpose(1, 2)
            ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
            ref = ref.transpose(1, 2).reshape(batch * length, hq, d)
            impls = {
                "kiln triton (paged)": lambda: prefill_attention(q, kc, vc, tables, cu, ctx, length, d ** -0.5, 16),
                "torch sdpa (dense)": lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True),
            }
            if fa is not None:
                kf, vf = kd.transpose(1, 2).reshape(-1, hkv, d), vd.transpose(1, 2).reshape(-1, hkv, d)
                impls["flash-attn varlen (dense)"] = lambda: fa.flash_attn_varlen_func(
                    q, kf, vf, cu, cu, length, length, causal=True)
            for name, fn in impls.items():
                t = timeit(fn, args.iters)
                out = fn()
                err = rel(out.transpose(1, 2).reshape_as(ref) if out.dim() == 4 else out, ref)
                rows.append(dict(kernel="prefill", impl=name, batch=batch, context=length, hq=hq, hkv=hkv,
                                 d=d, ms=t * 1e3, tflops=flops / t / 1e12, tbps=nbytes / t / 1e12, rel_err=err))
                report(rows[-1])
            del kc, vc, kd, vd, q
            torch.cuda.empty_cache()


def tune_prefill(args, rows: list[dict]) -> None:
    """Try tile configs (BLOCK_M, BLOCK_N, warps, stages) of the prefill kernel."""
    from kiln.kernels.prefill_attention import prefill_attention

    d = 128
    configs = [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2),
               (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
    for batch, length in ((8, 512), (1, 8192)):
        kc, vc, tables, kd, vd = paged_cache(batch, length, 8, d, 16, torch.bfloat16)
        q = torch.randn(batch * length, 32, d, device="cuda", dtype=torch.bfloat16)
        cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * length
        ctx = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        qd = q.view(batch, length, 32, d).transpose(1, 2)
        ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)
        ref = ref.transpose(1, 2).reshape(batch * length, 32, d)
        flops = 2 * batch * 32 * d * length * length
        for cfg in configs:
            def fn(cfg=cfg):
                return prefill_attention(q, kc, vc, tables, cu, ctx, length, d ** -0.5, 16, config=cfg)
            try:
                t = timeit(fn, args.iters)
            except Exception as exc:  # a config that does not fit (shared memory) is skipped
                print(f"prefill tune {cfg}: {type(exc).__name__}", flush=True)
                continue
            rows.append(dict(kernel="prefill-tune", impl=f"kiln triton {cfg}", batch=batch, context=length, hq=32,
                             hkv=8, d=d, ms=t * 1e3, tflops=flops / t / 1e12, tbps=0.0, rel_err=rel(fn(), ref)))
            report(rows[-1])


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """The same call captured in a CUDA graph, as the engine runs decode: no launch overhead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_decode(args, rows: list[dict]) -> None:
    from kiln.kernels.decode_attention import decode_attention, num_splits_for

    fa = flash()
    d = 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for hq, hkv in ((32, 8), (64, 8)):
        for batch, length in ((1, 512), (1, 4096), (1, 32768), (8, 4096), (16, 8192), (32, 2048),
                              (64, 512), (64, 4096), (64, 16384)):
            kc, vc, tables, kd, vd = paged_cache(batch, length, hkv, d, 16, torch.bfloat16)
            q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
            ctx = torch.full((batch,), length, device="cuda", dtype=torch.int32)
            flops = 4 * batch * hq * d * length
            nbytes = BYTES * batch * (2 * length * hkv * d + 2 * hq * d)
            splits = num_splits_for(batch, hkv, length, sms)
            qd = q.unsqueeze(2)
            ref = F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True).squeeze(2)
            ours = lambda: decode_attention(q, kc, vc, tables, ctx, d ** -0.5, 16, length, splits)  # noqa: E731
            impls = {
                f"kiln triton (paged, {splits} splits)": ours,
                "  same, CUDA graph replay": graphed(ours),
                "torch sdpa (dense)": lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True).squeeze(2),
            }
            if fa is not None:
                kf, vf = kd.transpose(1, 2), vd.transpose(1, 2)
                impls["flash-attn kvcache (dense)"] = lambda: fa.flash_attn_with_kvcache(
                    q.unsqueeze(1), kf, vf, cache_seqlens=ctx).squeeze(1)
            for name, fn in impls.items():
                t = timeit(fn, args.iters)
                res = ours() if "graph" in name else fn()
                rows.append(dict(kernel="decode", impl=name, batch=batch, context=length, hq=hq, hkv=hkv, d=d,
                                 ms=t * 1e3, tflops=flops / t / 1e12, tbps=nbytes / t / 1e12, rel_err=rel(res, ref)))
                report(rows[-1])
            del kc, vc, kd, vd
            torch.cuda.empty_cache()


def bench_elementwise(args, rows: list[dict]) -> None:
    from kiln.kernels.kv_write import kv_write
    from kiln.kernels.rmsnorm import rmsnorm
    from kiln.kernels.rotary import rotary_inplace
    from kiln.kernels.swiglu import swiglu

    bf = dict(device="cuda", dtype=torch.bfloat16)
    for T in (64, 4096):
        hq, hkv, d, hidden, inter = 32, 8, 128, 4096, 14336
        k, v = torch.randn(T, hkv, d, **bf), torch.randn(T, hkv, d, **bf)
        kc, vc = torch.zeros(65536, hkv, d, **bf), torch.zeros(65536, hkv, d, **bf)
        slots = torch.randperm(65536, device="cuda")[:T]
        x, r, w = torch.randn(T, hidden, **bf), torch.randn(T, hidden, **bf), torch.randn(hidden, **bf)
        q = torch.randn(T, hq, d, **bf)
        cos, sin = torch.randn(8192, d // 2, device="cuda"), torch.randn(8192, d // 2, device="cuda")
        pos = torch.randint(0, 8192, (T,), device="cuda")
        gu = torch.randn(T, 2 * inter, **bf)

        def torch_kv() -> None:
            kc[slots] = k
            vc[slots] = v

        def torch_rope() -> None:
            c, s = cos[pos].unsqueeze(1).bfloat16(), sin[pos].unsqueeze(1).bfloat16()
            for t in (q, k):
                a, b = t.chunk(2, -1)
                torch.cat((a * c - b * s, b * c + a * s), -1)

        cases = [
            ("kv_write", 2 * 2 * T * hkv * d * BYTES, lambda: kv_write(k, v, kc, vc, slots), torch_kv),
            ("rmsnorm+residual", 4 * T * hidden * BYTES, lambda: rmsnorm(x, w, 1e-5, r),
             lambda: F.rms_norm(x + r, (hidden,), w, 1e-5)),
            ("rotary q+k", 2 * T * (hq + hkv) * d * BYTES, lambda: rotary_inplace(q, k, cos, sin, pos), torch_rope),
            ("swiglu", 3 * T * inter * BYTES, lambda: swiglu(gu), lambda: F.silu(gu[:, :inter]) * gu[:, inter:]),
        ]
        for name, nbytes, ours, base in cases:
            for impl, fn in (("kiln triton", ours), ("torch eager", base)):
                t = timeit(fn, args.iters)
                rows.append(dict(kernel=name, impl=impl, batch=T, ms=t * 1e3, tflops=0.0, tbps=nbytes / t / 1e12))
                report(rows[-1])


def report(row: dict) -> None:
    shape = f"B={row['batch']}" + (f" L={row['context']} H={row['hq']}/{row['hkv']}" if "context" in row else "")
    err = f" err={row['rel_err']:.1e}" if "rel_err" in row else ""
    print(f"{row['kernel']:<16} {row['impl']:<30} {shape:<28} {row['ms']:9.3f} ms "
          f"{row['tflops']:7.1f} TFLOP/s {row['tbps']:6.2f} TB/s{err}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["prefill", "decode", "elementwise", "tune"], action="append",
                        help="run only these parts (repeatable); 'tune' sweeps prefill tile configs")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="write every row and the ceilings here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device on this machine; nothing to time.")
        return 0
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    import triton

    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}, flash-attn {'yes' if flash() else 'not installed'}")
    ceil = ceilings()
    print(f"measured ceilings: {ceil['tflops']:.0f} TFLOP/s (bf16 8192^3 matmul), "
          f"{ceil['tbps']:.2f} TB/s (device-to-device copy, read + write)", flush=True)
    rows: list[dict] = []
    only = set(args.only or ["prefill", "decode", "elementwise"])
    if "prefill" in only:
        bench_prefill(args, rows)
    if "decode" in only:
        bench_decode(args, rows)
    if "elementwise" in only:
        bench_elementwise(args, rows)
    if "tune" in only:
        tune_prefill(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "host": platform.node(), "ceilings": ceil, "rows": rows,
                       "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
