"""The CPU backend's attention against a float64 reference written here (softmax attention
over each sequence's context gathered through its block table): kiln's C++ paged decode kernel (bfloat16 and float32, every
GQA group size it specialises, both of its task layouts), the gather + SDPA fallback, and the
prefill paths (fresh short and long prompts, chunks over cached context)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kiln.kernels import cpu_ops
from kiln.runtime.backends.base import AttentionMetadata, PrefillSlice
from kiln.runtime.backends.cpu import CpuBackend
from kiln.runtime.models.loader import cache_dir

BS = 16


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
              context_len: int, scale: float, block_size: int = BS) -> torch.Tensor:
    """float64 attention of one sequence's n newest queries [n, H, D] over its context_len
    cached tokens (the queries are the last n positions, causal), GQA by head groups.
    Deliberately not kiln.kernels' references: importing those Triton modules here would fix
    their interpreter mode before tests/test_cuda_backend.py sets it."""
    n, H, D = q.shape
    group = H // k_cache.shape[1]
    pos = torch.arange(context_len)
    slots = block_ids[pos // block_size].long() * block_size + pos % block_size
    k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [ctx, H, D]
    v = v_cache[slots].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(n) + context_len - n
    scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def decode_reference(q, k_cache, v_cache, tables, lens, scale, block_size: int = BS) -> torch.Tensor:
    return torch.cat([reference(q[b:b + 1], k_cache, v_cache, tables[b], int(lens[b]), scale, block_size)
                      for b in range(q.shape[0])])


@pytest.fixture(scope="module")
def kernel_built() -> bool:
    built = cpu_ops.load(cache_dir())
    # The test machines have a compiler: the kernel must build there, not silently fall back.
    assert built, "kiln's C++ decode kernel did not build (see the warning in the log)"
    return built


def _decode_case(B: int, Hkv: int, G: int, D: int, dtype: torch.dtype, seed: int = 0, max_len: int = 150,
                 fixed: dict[int, int] | None = None):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (B,), generator=g)
    lens[0] = 1  # a context of one token
    if B > 1:
        lens[1] = 2 * BS  # ends exactly on a block boundary
    for b, n in (fixed or {}).items():
        if b < B:
            lens[b] = n
    blocks = int(-(-lens.max() // BS))
    num_blocks = B * blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: B * blocks].view(B, blocks).clone()
    k = torch.randn(num_blocks * BS, Hkv, D, generator=g).to(dtype)
    v = torch.randn(num_blocks * BS, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    return q, k, v, tables, lens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,Hkv,G,D", [(1, 3, 3, 64), (5, 3, 3, 64), (32, 3, 3, 64), (9, 2, 4, 128),
                                       (12, 2, 7, 64), (3, 1, 1, 64), (10, 2, 2, 80)])
def test_paged_decode_kernel_matches_float64_reference(kernel_built, dtype, B, Hkv, G, D):
    """B=1 and 5 split the heads over tasks, 32 runs whole sequences; D=80 takes the generic
    (unspecialised) loop, G=7 with D=64 is Qwen2-0.5B's shape, G=4 with D=128 Llama-3-8B's."""
    q, k, v, tables, lens = _decode_case(B, Hkv, G, D, dtype)
    scale = D ** -0.5
    got = cpu_ops.paged_decode(q.view(B, Hkv, G, D), k, v, tables, lens, BS, scale)
    assert got.dtype == dtype and got.shape == (B, Hkv, G, D)
    ref = decode_reference(q, k, v, tables, lens, scale)
    err = (got.view(B, Hkv * G, D).double() - ref).abs().max().item()
    # bfloat16: the output's own rounding (8 bits of mantissa on values of magnitude ~1).
    assert err < (1.6e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,G", [(1, 3), (3, 3), (10, 3), (2, 8)])
def test_paged_decode_kernel_long_contexts_match_float64_reference(kernel_built, dtype, B, G):
    """Contexts past the kernel's 256-position chunks: the bfloat16 kernel splits them and merges
    the chunks' partial softmaxes (a context of exactly two chunks, one a position past it, the
    rest random up to ~3 chunks), a few sequences or many."""
    Hkv, D = 3, 64
    q, k, v, tables, lens = _decode_case(B, Hkv, G, D, dtype, seed=B, max_len=800, fixed={0: 512, 2: 257})
    # Make one chunk's scores far above another's: the merge must rescale, not add raw sums.
    k[tables[0, 0] * BS:(tables[0, 0] + 1) * BS] *= 4
    scale = D ** -0.5
    got = cpu_ops.paged_decode(q.view(B, Hkv, G, D), k, v, tables, lens, BS, scale)
    ref = decode_reference(q, k, v, tables, lens, scale)
    err = (got.view(B, Hkv * G, D).double() - ref).abs().max().item()
    assert err < (1.6e-2 if dtype == torch.bfloat16 else 1e-5), err


@pytest.mark.parametrize("block_size", [8, 16, 32, 48])
def test_paged_decode_kernel_reads_only_the_context(kernel_built, block_size):
    """Every cache slot outside the contexts holds NaN (freed or never-written blocks may hold
    anything). On AMX CPUs, block sizes 16, 32 and 48 take the tile path, which loads whole
    16-position tiles and 32-position groups: what lies past a context must be masked out, not
    multiplied by a zero probability (NaN * 0 is NaN). Block size 8 takes the AVX-512 path.
    Contexts: 1 position, one short of and one past a 16- and a 32-position group, a block
    boundary, and past the 256-position chunk (split and merged)."""
    B, Hkv, G, D = 12, 3, 3, 64
    g = torch.Generator().manual_seed(block_size)
    lens = torch.tensor([1, 15, 17, 31, 33, block_size, 257, 300, 2, 100, 64, 129])
    blocks = int(-(-lens.max() // block_size))
    num_blocks = B * blocks + 2
    tables = torch.randperm(num_blocks, generator=g)[: B * blocks].view(B, blocks).clone()
    k = torch.full((num_blocks * block_size, Hkv, D), float("nan"), dtype=torch.bfloat16)
    v = torch.full_like(k, float("nan"))
    for b in range(B):
        pos = torch.arange(int(lens[b]))
        slots = tables[b][pos // block_size] * block_size + pos % block_size
        k[slots] = torch.randn(len(pos), Hkv, D, generator=g).bfloat16()
        v[slots] = torch.randn(len(pos), Hkv, D, generator=g).bfloat16()
    q = torch.randn(B, Hkv * G, D, generator=g).bfloat16()
    scale = D ** -0.5
    got = cpu_ops.paged_decode(q.view(B, Hkv, G, D), k, v, tables, lens, block_size, scale)
    assert not got.isnan().any()
    ref = decode_reference(q, k, v, tables, lens, scale, block_size)
    err = (got.view(B, Hkv * G, D).double() - ref).abs().max().item()
    assert err < 1.6e-2, err


def test_paged_decode_kernel_result_does_not_depend_on_the_batch(kernel_built):
    """A sequence's output is the same alone or among others (its chunking follows its own
    length, and the task layout does not change the arithmetic)."""
    B, Hkv, G, D = 12, 3, 3, 64
    q, k, v, tables, lens = _decode_case(B, Hkv, G, D, torch.bfloat16, seed=3, max_len=900)
    q4 = q.view(B, Hkv, G, D)
    together = cpu_ops.paged_decode(q4, k, v, tables, lens, BS, 0.125)
    for b in (0, 5, 11):
        alone = cpu_ops.paged_decode(q4[b:b + 1].contiguous(), k, v, tables[b:b + 1].contiguous(),
                                     lens[b:b + 1].contiguous(), BS, 0.125)
        assert torch.equal(alone[0], together[b]), b


def test_paged_decode_kernel_refuses_bad_inputs(kernel_built):
    q, k, v, tables, lens = _decode_case(2, 3, 3, 64, torch.float32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_ops.paged_decode(q.view(2, 3, 3, 64), k.bfloat16(), v.bfloat16(), tables, lens, BS, 0.1)
    with pytest.raises(RuntimeError, match="int64"):
        cpu_ops.paged_decode(q.view(2, 3, 3, 64), k, v, tables.int(), lens, BS, 0.1)


def _backend(dtype: torch.dtype, H: int = 9, Hkv: int = 3, D: int = 64, num_blocks: int = 64) -> CpuBackend:
    return CpuBackend(1, H, Hkv, D, num_blocks, BS, dtype)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp-kernel", "gather-sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backend_decode_and_prefill_match_references(kernel_built, kernel, dtype):
    """One step as the model runner lays it out: 20 decodes (random contexts in shuffled
    blocks), then a fresh 40-token prompt (group-mask path), a fresh 300-token prompt (SDPA's
    causal GQA path) and a 25-token chunk over 70 cached tokens. cpp-kernel in bfloat16 takes
    the C++ prefill kernel where the CPU has AMX; gather-sdpa keeps SDPA for the prefills."""
    H, Hkv, D = 9, 3, 64
    backend = _backend(dtype, num_blocks=128)
    backend.paged_decode = kernel and backend.paged_decode
    backend.paged_prefill = kernel and backend.paged_prefill
    if kernel and dtype == torch.bfloat16:
        assert backend.paged_prefill == cpu_ops.paged_prefill_supported(D, H // Hkv)
    g = torch.Generator().manual_seed(5)
    cache = backend.kv[0]
    cache.copy_(torch.randn(cache.shape, generator=g).to(dtype))
    free = torch.randperm(128, generator=g).tolist()

    def take(n: int) -> list[int]:
        return [free.pop() for _ in range(n)]

    nd = 20
    lens = torch.randint(1, 120, (nd,), generator=g)
    tables = [take(-(-int(n) // BS)) for n in lens]
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    slots = [tables[i][(int(lens[i]) - 1) // BS] * BS + (int(lens[i]) - 1) % BS for i in range(nd)]
    prefills, start = [], nd
    for n, cached in ((40, 0), (300, 0), (25, 70)):
        blocks = take(-(-(n + cached) // BS))
        pos = torch.arange(cached, cached + n)
        bt = torch.tensor(blocks)
        slots += (bt[pos // BS] * BS + pos % BS).tolist()
        prefills.append(PrefillSlice(start, n, n + cached, bt))
        start += n
    T = start
    meta = AttentionMetadata(torch.tensor(slots), nd, lens, table_t, prefills)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(T, Hkv, D, generator=g).to(dtype)
    out = backend.attention(0, q, k, v, backend.prepare(meta)).view(T, H, D).double()

    kc, vc = backend.kv[0, 0].double(), backend.kv[0, 1].double()  # now holding the new k/v too
    scale = D ** -0.5
    ref_dec = decode_reference(q[:nd], kc, vc, table_t, lens, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out[:nd] - ref_dec).abs().max().item() < tol
    for p in prefills:
        ref = reference(q[p.query_start:p.query_start + p.query_len], kc, vc, p.block_ids, p.context_len, scale)
        err = (out[p.query_start:p.query_start + p.query_len] - ref).abs().max().item()
        assert err < tol, (p.query_len, p.context_len, err)


# -- the prefill kernel (kiln/kernels/cpu/paged_prefill.cpp) ----------------------------------
def _has_avx512_bf16() -> bool:
    return " avx512_bf16" in open("/proc/cpuinfo").read()


def _prefill_case(Hkv: int, G: int, D: int, block_size: int, cases: list[tuple[int, int]], lead: int, seed: int):
    """Prefills (query_len, context_len) laid out after `lead` decode rows, in shuffled blocks
    of a bf16 cache that already holds every context (as after the step's cache write)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-c // block_size) for _, c in cases]
    total = sum(nblocks) + 3
    perm = torch.randperm(total, generator=g)
    k = torch.randn(total * block_size, Hkv, D, generator=g).bfloat16()
    v = torch.randn(total * block_size, Hkv, D, generator=g).bfloat16()
    T = lead + sum(q for q, _ in cases)
    q = torch.randn(T, Hkv * G, D, generator=g).bfloat16()
    width = max(nblocks)
    tables = torch.zeros(len(cases), width, dtype=torch.long)
    starts, used, start = [], 0, lead
    for i, ((ql, _), nb) in enumerate(zip(cases, nblocks)):
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        starts.append(start)
        start += ql
    lens = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return q, k, v, tables, lens(starts), lens([c[0] for c in cases]), lens([c[1] for c in cases])


PREFILLS = [(113, 113), (40, 1040), (1, 17), (16, 16), (17, 33), (300, 300), (25, 95), (33, 64)]


@pytest.mark.parametrize("Hkv,G,D,block_size", [(3, 3, 64, 16), (3, 3, 64, 8), (3, 3, 64, 32), (2, 4, 128, 16),
                                                (1, 8, 64, 16), (4, 1, 64, 16), (2, 7, 64, 16)])
def test_paged_prefill_kernel_matches_float64_reference(kernel_built, Hkv, G, D, block_size):
    """Every prefill of a step in one call: fresh prompts (one query tile, several, a partial
    last one, 300 positions), chunks behind cached context (40 after 1,000; one token after 16),
    block sizes whose key tiles straddle blocks (8) or not (16, 32), GQA groups 1-8, head size
    128; the decode rows ahead of the prefills are left untouched. AMX tiles where the CPU has
    them, else AVX512-BF16 dot products; without AVX512-BF16 the kernel must say so and refuse,
    and the backend keeps SDPA."""
    q, k, v, tables, starts, qlens, ctx = _prefill_case(Hkv, G, D, block_size, PREFILLS, lead=5, seed=G * D)
    # Each context's last block scores far above the rest: a running max that jumps late, after
    # output has accumulated (the kernel must rescale it, not just the sums).
    for i, (_, c) in enumerate(PREFILLS):
        last = int(tables[i, (c - 1) // block_size])
        k[last * block_size:(last + 1) * block_size] *= 6
    out = torch.full((q.shape[0], Hkv, G, D), 7.0, dtype=torch.bfloat16)
    scale = D ** -0.5
    supported = cpu_ops.paged_prefill_supported(D, G)
    assert supported == _has_avx512_bf16()
    if not supported:
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            cpu_ops.paged_prefill(out, q, k, v, tables, starts, qlens, ctx, block_size, scale)
        assert not CpuBackend(1, Hkv * G, Hkv, D, 8, block_size, torch.bfloat16).paged_prefill
        return
    cpu_ops.paged_prefill(out, q, k, v, tables, starts, qlens, ctx, block_size, scale)
    assert (out[:5] == 7.0).all()  # decode rows: not the kernel's
    for i in range(len(PREFILLS)):
        s, n, c = int(starts[i]), int(qlens[i]), int(ctx[i])
        ref = reference(q[s:s + n], k, v, tables[i], c, scale, block_size)
        err = (out[s:s + n].view(n, Hkv * G, D).double() - ref).abs().max().item()
        # bfloat16 output rounding plus bf16 probabilities (as SDPA's bf16 kernel has them)
        assert err < 2e-2, (n, c, err)


@pytest.mark.skipif(" amx_bf16" not in open("/proc/cpuinfo").read(),
                    reason="this CPU has no AMX: the test above already ran the AVX512-BF16 kernel")
def test_paged_prefill_avx512_kernel_on_an_amx_cpu(kernel_built):
    """The AVX512-BF16 kernel (CPUs without AMX) against the same references, on a CPU that would
    otherwise take the AMX kernel: KILN_CPU_AMX=0 keeps every kernel off the tiles."""
    test = f"{__file__}::test_paged_prefill_kernel_matches_float64_reference"
    env = dict(os.environ, KILN_CPU_AMX="0")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "7 passed" in run.stdout, run.stdout[-1000:]


def test_paged_prefill_kernel_refuses_bad_inputs(kernel_built):
    q, k, v, tables, starts, qlens, ctx = _prefill_case(3, 3, 64, 16, [(20, 20), (10, 30)], lead=0, seed=1)
    out = torch.empty(q.shape[0], 3, 3, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        cpu_ops.paged_prefill(out.float(), q.float(), k.float(), v.float(), tables, starts, qlens, ctx, 16, 0.1)
    with pytest.raises(RuntimeError, match="int64"):
        cpu_ops.paged_prefill(out, q, k, v, tables.int(), starts, qlens, ctx, 16, 0.1)
    with pytest.raises(RuntimeError, match="prefill 1 has a bad"):
        cpu_ops.paged_prefill(out, q, k, v, tables, starts, qlens, torch.tensor([20, 5]), 16, 0.1)
    with pytest.raises(RuntimeError, match="prefill 1 has a bad"):  # past the end of q
        cpu_ops.paged_prefill(out, q, k, v, tables, torch.tensor([0, 25]), qlens, ctx, 16, 0.1)
    with pytest.raises(RuntimeError, match="bad ranks"):
        cpu_ops.paged_prefill(out, q.view(q.shape[0], 3, 3, 64), k, v, tables, starts, qlens, ctx, 16, 0.1)
    with pytest.raises(RuntimeError, match="q must be"):  # heads not contiguous within a token
        cpu_ops.paged_prefill(out, q.transpose(1, 2).contiguous().transpose(1, 2), k, v, tables, starts, qlens,
                              ctx, 16, 0.1)


# -- the fused elementwise ops (kiln/kernels/cpu/fused.cpp) ------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # relative to max |ref|


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == ref.shape
    err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", [(1, 576), (37, 576), (5, 100)])
def test_fused_rms_norm_matches_float64(kernel_built, dtype, N, H):
    g = torch.Generator().manual_seed(N + H)
    wide = torch.randn(N, H + 24, generator=g).to(dtype)
    x = wide[:, 7:7 + H]  # a strided view, as a row slice of a larger activation
    w = torch.randn(H, generator=g).to(dtype)
    ref = torch.nn.functional.rms_norm(x.double(), (H,), w.double(), 1e-5)
    _close(cpu_ops.rms_norm(x, w, 1e-5), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", [(1, 576), (37, 576), (5, 100)])
def test_fused_add_rms_norm_equals_add_then_norm(kernel_built, dtype, N, H):
    """residual += delta in place, then the norm: the same bits as torch's add followed by the
    separate kernel (so the fused model path changes no output), and close to float64; a strided
    residual (a row slice of a wider buffer) is updated where it lies."""
    g = torch.Generator().manual_seed(N * H)
    wide = torch.randn(N, H + 24, generator=g).to(dtype)
    residual = wide[:, 5:5 + H]
    delta = torch.randn(N, H, generator=g).to(dtype)
    w = torch.randn(H, generator=g).to(dtype)
    expect_res = residual + delta
    expect = cpu_ops.rms_norm(expect_res, w, 1e-5)
    before = residual.double().clone()
    out = cpu_ops.add_rms_norm(residual, delta, w, 1e-5)
    assert torch.equal(residual, expect_res) and torch.equal(wide[:, 5:5 + H], expect_res)
    assert torch.equal(out, expect)
    ref = torch.nn.functional.rms_norm(before + delta.double(), (H,), w.double(), 1e-5)
    _close(out, ref, dtype)


def test_fused_add_rms_norm_refuses_mismatches(kernel_built):
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_ops.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu_ops.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), torch.ones(7), 1e-5)


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,Hq,Hk,D", [(1, 9, 3, 64), (45, 9, 3, 64), (6, 4, 2, 80), (3, 2, 1, 128)])
def test_fused_rope_matches_float64(kernel_built, dtype, T, Hq, Hk, D):
    """q and k are views into one fused qkv row, as the model hands them over."""
    from kiln.runtime.models.layers import RotaryEmbedding

    g = torch.Generator().manual_seed(T * D)
    rope = RotaryEmbedding(D, 4096, 10000.0)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=g).to(dtype)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hk) * D].view(T, Hk, D)
    positions = torch.randint(0, 4096, (T,), generator=g)
    qo, ko = cpu_ops.rope(q, k, positions, rope.cos, rope.sin)
    assert qo.is_contiguous() and ko.is_contiguous()
    cos, sin = rope.cos[positions], rope.sin[positions]
    _close(qo, _rope_ref(q, cos, sin), dtype)
    _close(ko, _rope_ref(k, cos, sin), dtype)
    with pytest.raises(RuntimeError, match="outside the table"):
        cpu_ops.rope(q, k, torch.full((T,), 4096), rope.cos, rope.sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 1536), (33, 1536), (4, 100)])
def test_fused_silu_and_mul_matches_float64(kernel_built, dtype, T, I):
    g = torch.Generator().manual_seed(T + I)
    gate_up = (4 * torch.randn(T, 2 * I, generator=g)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, -30.0, 30.0, 0.0])  # the far tails of silu
    gate, up = gate_up.double().chunk(2, dim=-1)
    _close(cpu_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, dtype)


def test_prepare_model_swaps_in_the_fused_layers(kernel_built):
    """The default model's logits with the fused layers equal those of the plain torch
    layers (float32), and the swap really happened."""
    from kiln.runtime.backends.cpu import FusedMLP, FusedRMSNorm, FusedRotaryEmbedding
    from kiln.runtime.models.llama import LlamaForCausalLM
    from kiln.runtime.models.loader import resolve_model

    model = LlamaForCausalLM.from_folder(resolve_model("default"), torch.float32, max_positions=256)
    cfg = model.config
    n = 21
    meta = AttentionMetadata(torch.arange(n), 0, torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, 0, dtype=torch.long), [PrefillSlice(0, n, n, torch.arange(2))])
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    plain = CpuBackend(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 4, BS, torch.float32)
    want = model(ids, torch.arange(n), plain, plain.prepare(meta), torch.arange(n))
    fused = CpuBackend(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 4, BS, torch.float32)
    fused.prepare_model(model)
    assert type(model.rope) is FusedRotaryEmbedding and type(model.norm) is FusedRMSNorm
    assert all(type(layer.mlp) is FusedMLP for layer in model.layers)
    got = model(ids, torch.arange(n), fused, fused.prepare(meta), torch.arange(n))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# -- the batched LoRA term (cpu/lora.cpp) -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,sizes,R", [(576, (576, 192, 192), 64), (1536, (576,), 8), (100, (37, 300), 5)])
def test_lora_grouped_matches_float64(kernel_built, dtype, K, sizes, R):
    """Groups of 3, 1 and 12 rows (more than the kernel's 8-row tile) over three of five slots,
    rows out of order, x a strided view, an input width with a partial vector (100), a slot
    whose adapter has R - 2 ranks for its first part and one with none for its last (the rows
    past a slot's ranks hold NaN, which must not be read): y of the grouped rows gets
    x A_s^T B_s over each part's ranks, every other row and column is untouched to the bit."""
    g = torch.Generator().manual_seed(K + R)
    S, T, P = 5, 23, len(sizes)
    offsets = [sum(sizes[:p]) for p in range(P)]
    x = torch.randn(T, K + 7, generator=g).to(dtype)[:, 3:K + 3]  # row stride K + 7
    y = torch.randn(T, sum(sizes), generator=g).to(dtype)
    a = (torch.randn(S, P * R, K, generator=g) / K ** 0.5).to(dtype)
    bs = [torch.randn(S, R, n, generator=g).to(dtype) for n in sizes]
    ranks = torch.full((S, P), R, dtype=torch.int32)
    ranks[1, 0] = R - 2  # slot 1's first part has rank R - 2
    a[1, R - 2:R] = float("nan")
    bs[0][1, R - 2:] = float("nan")
    ranks[3, P - 1] = 0  # slot 3's adapter has no weights for the last part
    a[3, (P - 1) * R:] = float("nan")
    bs[P - 1][3] = float("nan")
    groups = [(3, [7, 1, 5]), (0, [2]), (1, [22] + list(range(10, 21)))]
    want = y.double().clone()
    for s, rows in groups:
        for p, (off, n) in enumerate(zip(offsets, sizes)):
            r = int(ranks[s, p])
            t = x[rows].double() @ a[s, p * R:p * R + r].double().t()
            want[rows, off:off + n] += t @ bs[p][s, :r].double()
    got = y.clone()
    ptr = torch.tensor([0, 3, 4, 16])
    rows = torch.tensor([r for _, rs in groups for r in rs])
    cpu_ops.lora_grouped(x, got, a, bs, offsets, ranks, torch.tensor([s for s, _ in groups]), ptr, rows)
    touched = rows.tolist()
    untouched = [i for i in range(T) if i not in touched]
    assert torch.equal(got[untouched], y[untouched])
    assert torch.equal(got[[7, 1, 5], offsets[-1]:], y[[7, 1, 5], offsets[-1]:])  # the absent part
    err = (got[touched].double() - want[touched]).norm() / want[touched].norm()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err


def test_lora_grouped_refuses_bad_indices(kernel_built):
    x, y = torch.randn(4, 16), torch.zeros(4, 8)
    a, bs, ranks = torch.randn(2, 4, 16), [torch.randn(2, 4, 8)], torch.full((2, 1), 4, dtype=torch.int32)
    ok = (torch.tensor([1]), torch.tensor([0, 2]))
    cpu_ops.lora_grouped(x, y, a, bs, [0], ranks, *ok, torch.tensor([0, 3]))
    assert y[[1, 2]].abs().sum() == 0 and y[[0, 3]].abs().sum() > 0
    with pytest.raises(RuntimeError, match="row out of range"):
        cpu_ops.lora_grouped(x, y, a, bs, [0], ranks, *ok, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="bad group"):
        cpu_ops.lora_grouped(x, y, a, bs, [0], ranks, torch.tensor([2]), ok[1], torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="outside y"):
        cpu_ops.lora_grouped(x, y, a, bs, [4], ranks, *ok, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="ranks must be"):
        cpu_ops.lora_grouped(x, y, a, bs, [0], ranks[:1], *ok, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="ranks must lie"):
        cpu_ops.lora_grouped(x, y, a, bs, [0], ranks + 1, *ok, torch.tensor([0, 1]))


# -- the one-row bfloat16 linear (cpu/gemv.cpp) ------------------------------------------------
@pytest.mark.parametrize("M,N,K", [(1, 960, 576), (1, 576, 1536), (3, 48, 6), (2, 16, 2), (1, 64, 34),
                                   (2, 960, 576), (17, 576, 1536), (33, 64, 96), (64, 3072, 576), (65, 32, 64)])
def test_gemv_bf16_matches_float64(kernel_built, M, N, K):
    """Every output of every row against float64 sums of the same bfloat16 values (K with an
    odd number of column pairs, a strided x); the one rounding to bfloat16 is the only error.
    2-64 rows with K a multiple of 32 take the AMX tile path where the CPU has it (partial
    16-row tiles: 17, 33), else passes of up to 6 rows; 65 rows the per-row loop."""
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K + 8, generator=g).bfloat16()[:, 4:K + 4]  # row stride K + 8, unit inner stride
    ref = x.double() @ w.double().t()
    packed = cpu_ops.pack_gemv_bf16(w)
    if not cpu_ops.gemv_bf16_supported():  # no AVX512-BF16 on this CPU: a clear refusal (kiln keeps oneDNN)
        with pytest.raises(RuntimeError, match="no AVX512-BF16"):
            cpu_ops.gemv_bf16(x, packed)
        return
    got = cpu_ops.gemv_bf16(x, packed)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # float32 sums rounded once to bfloat16: within half a bfloat16 ulp of |ref| plus sum error
    bound = ref.abs() * 2.0 ** -8 + 1e-4 * (x.double().abs() @ w.double().abs().t())
    assert bool(((got.double() - ref).abs() <= bound).all())


def test_gemv_bf16_max_rows_follows_the_cpu(kernel_built):
    """64 rows wherever the kernel runs (AMX tiles, or AVX512-BF16 passes of 6 rows), one where
    it does not (the engine's linears carrying that limit: tests/test_cpu_decode_loop.py)."""
    assert cpu_ops.gemv_bf16_max_rows() == (64 if cpu_ops.gemv_bf16_supported() else 1)


_AMX_CPU = " amx_bf16" in open("/proc/cpuinfo").read()
_ROWS_CASES = [(2, 960, 576), (5, 48, 6), (6, 16, 34), (7, 576, 1536), (13, 32, 64), (33, 48, 96), (64, 3072, 576)]


@pytest.mark.skipif(_AMX_CPU and os.environ.get("KILN_CPU_AMX") != "0",
                    reason="AMX tiles round differently; the test below runs this one with KILN_CPU_AMX=0")
@pytest.mark.parametrize("M,N,K", _ROWS_CASES)
def test_gemv_bf16_rows_together_give_each_rows_own_bits(kernel_built, M, N, K):
    """Without AMX, 2-64 rows run in passes of up to 6 rows over pairs of weight blocks, each
    output summed as the one-row kernel sums it: a row's bits must not depend on the rows it is
    batched with (partial passes, an odd number of blocks N/16 and of column pairs K/2, a
    strided x), for the plain linear and the one with SwiGLU fused."""
    if not cpu_ops.gemv_bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16: kiln keeps oneDNN (the refusal is tested above)")
    g = torch.Generator().manual_seed(M * N + K)
    w = (torch.randn(N, K, generator=g) * 0.3).bfloat16()
    x = torch.randn(M, K + 8, generator=g).bfloat16()[:, 4:K + 4]
    packed = cpu_ops.pack_gemv_bf16(w)
    together = cpu_ops.gemv_bf16(x, packed)
    alone = torch.cat([cpu_ops.gemv_bf16(x[i:i + 1], packed) for i in range(M)])
    assert torch.equal(together.view(torch.int16), alone.view(torch.int16))
    if N % 32 == 0:
        together = cpu_ops.gemv_silu_bf16(x, packed)
        alone = torch.cat([cpu_ops.gemv_silu_bf16(x[i:i + 1], packed) for i in range(M)])
        assert torch.equal(together.view(torch.int16), alone.view(torch.int16))


@pytest.mark.skipif(not _AMX_CPU, reason="this CPU has no AMX: the test above ran the AVX512-BF16 passes")
def test_gemv_bf16_avx512_rows_on_an_amx_cpu(kernel_built):
    """The AVX512-BF16 row passes on a CPU that would otherwise take the AMX tiles."""
    test = f"{__file__}::test_gemv_bf16_rows_together_give_each_rows_own_bits"
    env = dict(os.environ, KILN_CPU_AMX="0")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"{len(_ROWS_CASES)} passed" in run.stdout, run.stdout[-1000:]


def test_gemv_bf16_refuses_bad_shapes(kernel_built):
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_ops.pack_gemv_bf16(torch.zeros(24, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="K even"):
        cpu_ops.pack_gemv_bf16(torch.zeros(16, 7, dtype=torch.bfloat16))
    packed = cpu_ops.pack_gemv_bf16(torch.zeros(16, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="K = x's columns"):
        cpu_ops.gemv_bf16(torch.zeros(1, 6, dtype=torch.bfloat16), packed)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        cpu_ops.gemv_bf16(torch.zeros(1, 8), packed)


@pytest.mark.parametrize("M,I,K", [(1, 1536, 576), (2, 1536, 576), (16, 32, 64), (17, 48, 96), (33, 1536, 576),
                                   (48, 16, 32), (49, 64, 64), (64, 1536, 576), (3, 48, 6), (65, 32, 64)])
def test_gemv_silu_bf16_gives_the_bits_of_the_two_steps(kernel_built, M, I, K):
    """The gate/up linear with SwiGLU applied to its tiles (what the decode MLP runs) must give
    exactly silu_and_mul(gemv_bf16(x, W)): the same bfloat16 rounding of both halves, the same
    formula. Rows in every tile arrangement (1-4 sixteen-row tiles, partial ones), an odd
    number of 16-column blocks per half (I = 48), the per-row path (K = 6, 65 rows), a strided
    x; and the result against float64."""
    g = torch.Generator().manual_seed(M * I + K)
    w = (torch.randn(2 * I, K, generator=g) * 0.2).bfloat16()
    x = torch.randn(M, K + 8, generator=g).bfloat16()[:, 4:K + 4]
    packed = cpu_ops.pack_gemv_bf16(w)
    if not cpu_ops.gemv_bf16_supported():
        with pytest.raises(RuntimeError, match="no AVX512-BF16"):
            cpu_ops.gemv_silu_bf16(x, packed)
        return
    got = cpu_ops.gemv_silu_bf16(x, packed)
    assert got.dtype == torch.bfloat16 and got.shape == (M, I)
    assert torch.equal(got.view(torch.int16), cpu_ops.silu_and_mul(cpu_ops.gemv_bf16(x, packed)).view(torch.int16))
    gate, up = (x.double() @ w.double().t()).split(I, dim=1)
    ref = torch.nn.functional.silu(gate) * up
    assert float((got.double() - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_gemv_silu_bf16_refuses_a_weight_it_cannot_halve(kernel_built):
    packed = cpu_ops.pack_gemv_bf16(torch.zeros(48, 64, dtype=torch.bfloat16))  # three 16-row blocks
    with pytest.raises(RuntimeError, match="two halves"):
        cpu_ops.gemv_silu_bf16(torch.zeros(2, 64, dtype=torch.bfloat16), packed)
    with pytest.raises(RuntimeError, match="K = x's columns"):
        cpu_ops.gemv_silu_bf16(torch.zeros(2, 32, dtype=torch.bfloat16), packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(1, 49152), (64, 49152), (5, 1000), (3, 7)])
def test_argmax_rows_matches_torch(kernel_built, dtype, N, V):
    """The sampler's argmax kernel against torch.max(dim).indices: the first index of a tied
    maximum, a maximum in the scalar tail, -inf rows, NaN (counts as the maximum, first one),
    and rows of a wider tensor (a row stride past V)."""
    g = torch.Generator().manual_seed(N * V)
    wide = torch.randn(N, V + 5, generator=g).to(dtype)
    x = wide[:, :V]
    x[0, V // 3] = x[0, 2 * V // 3] = 50  # a tie: the first wins
    if N > 1:
        x[1, V - 1] = 60  # in the tail past the last 16 columns
    if N > 2:
        x[2] = float("-inf")
    if N > 3:
        x[3, V // 2] = x[3, V - 2] = float("nan")
    got = cpu_ops.argmax_rows(x)
    assert got.dtype == torch.long
    assert torch.equal(got, x.max(dim=-1).indices)
    assert got[0] == V // 3


def test_argmax_rows_refuses_bad_inputs(kernel_built):
    with pytest.raises(RuntimeError, match="unit inner stride"):
        cpu_ops.argmax_rows(torch.zeros(4, 8).t())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_ops.argmax_rows(torch.zeros(2, 8, dtype=torch.float64))


# -- work claimed at run time (cpu/parallel.h) --------------------------------------------------
def test_kernels_give_the_same_bits_on_one_thread_and_on_two_with_one_preempted(kernel_built):
    """The decode kernels hand their work out at run time: each thread takes its own share in
    order and a thread that finishes early goes on with another's unclaimed pieces. A busy
    process pinned to the first core keeps preempting one thread, so the other takes over
    pieces of its share; every output must still be the bits one thread computes alone (each
    piece done exactly once, where it belongs)."""
    import subprocess
    import sys

    g = torch.Generator().manual_seed(11)
    w = torch.randn(3072, 576, generator=g).bfloat16()
    packed = cpu_ops.pack_gemv_bf16(w) if cpu_ops.gemv_bf16_supported() else None
    xs = [torch.randn(m, 576, generator=g).bfloat16() for m in (1, 33, 64)]
    q, k, v, tables, lens = _decode_case(64, 3, 3, 64, torch.bfloat16, seed=5, max_len=600)
    residual = torch.randn(64, 576, generator=g).bfloat16()
    delta = torch.randn(64, 576, generator=g).bfloat16()
    weight = torch.randn(576, generator=g).bfloat16()
    gate_up = torch.randn(64, 2 * 1536, generator=g).bfloat16()

    def run() -> list[torch.Tensor]:
        out = [cpu_ops.paged_decode(q.view(64, 3, 3, 64), k, v, tables, lens, BS, 0.125),
               cpu_ops.silu_and_mul(gate_up)]
        r = residual.clone()
        out += [cpu_ops.add_rms_norm(r, delta, weight, 1e-5), r]
        if packed is not None:
            out += [cpu_ops.gemv_bf16(x, packed) for x in xs] + [cpu_ops.gemv_silu_bf16(x, packed) for x in xs]
        return out

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run()
        torch.set_num_threads(2)
        hog = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
        try:
            for _ in range(20):
                for a, b in zip(alone, run()):
                    assert torch.equal(a, b)
        finally:
            hog.kill()
            hog.wait()
    finally:
        torch.set_num_threads(threads)
