"""kiln/kernels against their plain-torch references computed in float64.

On this machine (no GPU) every Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors.
With KILN_TEST_CUDA=1 on a CUDA machine the same cases run compiled on the GPU. Outputs are
poisoned with NaN before each run, so an element the kernel forgot to write fails the
comparison; each case draws fresh random inputs from its own seed.
"""

from __future__ import annotations

import os

import torch

CUDA = os.environ.get("KILN_TEST_CUDA") == "1" and torch.cuda.is_available()
if not CUDA:
    # Must be set before kiln.kernels is imported: @triton.jit reads it when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kiln.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from kiln.kernels.kv_write import kv_write, kv_write_ref  # noqa: E402
from kiln.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from kiln.kernels.rmsnorm import rmsnorm, rmsnorm_ref  # noqa: E402
from kiln.kernels.rotary import rotary_inplace, rotary_ref  # noqa: E402
from kiln.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: 1e-4, BF16: 1e-2, F16: 1e-2}  # float32 "well under 1e-3"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf (NaN never passes)."""
    out = out.double().cpu()
    ref = ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def paged(g: torch.Generator, contexts: list[int], block_size: int) -> tuple[torch.Tensor, int]:
    """Block tables [S, max blocks] int32 over shuffled physical blocks (so no sequence is
    contiguous in the cache), and the number of blocks the cache needs."""
    need = [-(-c // block_size) for c in contexts]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(contexts), max(need), dtype=torch.int32)
    used = 0
    for row, n in enumerate(need):
        tables[row, :n] = perm[used:used + n]
        used += n
    return tables.to(DEV), num_blocks


# -- prefill attention ------------------------------------------------------------------
# (dtype, head_dim, q heads, kv heads, block size, [(cached, new) per sequence])
# Cached lengths end mid-block (5, 23, 40, 7, 70) and on a block edge (16, 32, 48, 64); new
# lengths range from 1 to 200; group sizes 1, 3, 4, 8 (8 over one KV head is MQA).
PREFILL_CASES = [
    (F32, 64, 2, 2, 16, [(0, 1), (0, 37), (16, 20), (5, 64)]),
    (BF16, 80, 6, 2, 32, [(0, 200), (32, 1), (40, 17)]),
    (F16, 96, 4, 1, 16, [(0, 3), (23, 50), (48, 9), (70, 60)]),
    (F32, 128, 8, 1, 32, [(0, 130), (64, 70), (7, 2)]),
    (BF16, 64, 9, 3, 16, [(0, 12), (16, 16)]),  # the default model's shape
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2] // c[3]}-bs{c[4]}")
def test_prefill_attention(case) -> None:
    dtype, D, H, Hkv, bs, seqs = case
    g = gen(hash((D, H, Hkv, bs)) % 2**31)
    contexts = [c + n for c, n in seqs]
    tables, num_blocks = paged(g, contexts, bs)
    k_cache = randn(g, num_blocks * bs, Hkv, D, dtype=dtype)
    v_cache = randn(g, num_blocks * bs, Hkv, D, dtype=dtype)
    lens = [n for _, n in seqs]
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = randn(g, sum(lens), H, D, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, tables, cu, ctx, max(lens), D ** -0.5, bs, out=out)
    ref = prefill_attention_ref(q.double(), k_cache, v_cache, tables, cu, ctx, D ** -0.5, bs)
    assert rel_err(out, ref) < TOL[dtype]


# -- decode attention -------------------------------------------------------------------
# (dtype, head_dim, q heads, kv heads, block size, contexts, splits, max_context)
DECODE_CASES = [
    (F32, 64, 2, 2, 16, [1, 16, 33], 1, None),
    (BF16, 80, 9, 3, 32, [5, 64, 250], 3, None),
    (F16, 96, 4, 1, 16, [300, 2, 17], 4, None),
    (F32, 128, 8, 1, 32, [129, 1], 2, None),
    (F32, 64, 8, 2, 16, [40, 3], 8, 512),  # graph-style bound: most splits are empty
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0]}-d{c[1]}-g{c[2] // c[3]}-bs{c[4]}-s{c[6]}")
def test_decode_attention(case) -> None:
    dtype, D, H, Hkv, bs, contexts, splits, bound = case
    g = gen(hash((D, H, Hkv, bs, splits)) % 2**31)
    tables, num_blocks = paged(g, contexts, bs)
    k_cache = randn(g, num_blocks * bs, Hkv, D, dtype=dtype)
    v_cache = randn(g, num_blocks * bs, Hkv, D, dtype=dtype)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=DEV)
    q = randn(g, len(contexts), H, D, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, tables, ctx, D ** -0.5, bs, bound or max(contexts), splits, out=out)
    ref = decode_attention_ref(q.double(), k_cache, v_cache, tables, ctx, D ** -0.5, bs)
    assert rel_err(out, ref) < TOL[dtype]


# -- KV write ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,D,Hkv", [(F32, 64, 3), (BF16, 80, 1), (F16, 128, 8)])
def test_kv_write(dtype, D, Hkv) -> None:
    g = gen(D + Hkv)
    slots_total, T = 96, 21
    # New K/V as strided views of a fused qkv output, as the model hands them over.
    qkv = randn(g, T, 3 * Hkv * D, dtype=dtype)
    k = qkv[:, Hkv * D:2 * Hkv * D].view(T, Hkv, D)
    v = qkv[:, 2 * Hkv * D:].view(T, Hkv, D)
    slots = torch.randperm(slots_total, generator=g)[:T].to(DEV)
    slots[3] = -1  # a padding row: skipped
    k_cache = randn(g, slots_total, Hkv, D, dtype=dtype)
    v_cache = randn(g, slots_total, Hkv, D, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_write(k, v, k_cache, v_cache, slots)
    kv_write_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# -- fused elementwise ops ----------------------------------------------------------------
@pytest.mark.parametrize("dtype,N,residual", [(F32, 576, True), (BF16, 64, False), (F16, 1000, True)])
def test_rmsnorm(dtype, N, residual) -> None:
    g = gen(N)
    x = randn(g, 7, N, dtype=dtype)
    r = randn(g, 7, N, dtype=dtype) if residual else None
    w = randn(g, N, dtype=dtype)
    y = torch.full_like(x, float("nan"))
    r_out = torch.full_like(x, float("nan")) if residual else None
    rmsnorm(x, w, 1e-5, r, out=y, residual_out=r_out)
    y_ref, r_ref = rmsnorm_ref(x.double(), w.double(), 1e-5, r.double() if residual else None)
    assert rel_err(y, y_ref) < TOL[dtype]
    if residual:
        assert rel_err(r_out, r_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype,D,Hq,Hk", [(F32, 64, 9, 3), (BF16, 80, 4, 1), (F16, 96, 8, 8), (F32, 128, 6, 2)])
def test_rotary(dtype, D, Hq, Hk) -> None:
    g = gen(D * Hq)
    T, max_pos = 13, 300
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    cos, sin = ang.cos().float().to(DEV), ang.sin().float().to(DEV)
    qkv = randn(g, T, (Hq + 2 * Hk) * D, dtype=dtype)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    positions = torch.randint(0, max_pos, (T,), generator=g).to(DEV)
    q_ref = rotary_ref(q.double().cpu(), ang.cos(), ang.sin(), positions.cpu())
    k_ref = rotary_ref(k.double().cpu(), ang.cos(), ang.sin(), positions.cpu())
    v_before = qkv[:, (Hq + Hk) * D:].clone()
    rotary_inplace(q, k, cos, sin, positions)
    assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k, k_ref) < TOL[dtype]
    assert torch.equal(qkv[:, (Hq + Hk) * D:], v_before)  # v untouched


@pytest.mark.parametrize("dtype,N", [(F32, 1536), (BF16, 100), (F16, 2048 + 17)])
def test_swiglu(dtype, N) -> None:
    g = gen(N)
    gate_up = randn(g, 5, 2 * N, dtype=dtype)
    out = torch.full((5, N), float("nan"), dtype=dtype, device=DEV)
    swiglu(gate_up, out=out)
    assert rel_err(out, swiglu_ref(gate_up.double())) < TOL[dtype]
