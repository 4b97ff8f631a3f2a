"""Prefill attention, FlashAttention-2 style, over the paged KV cache.

One launch covers every prefilling sequence of the step (cumulative query lengths). Each
program owns a tile of BLOCK_M queries of one sequence and one query head; it walks the
sequence's context in tiles of BLOCK_N keys, reading K/V through the block table, and keeps
an online softmax (running max and sum), so the score matrix is never materialised. The
context is everything in the cache for that sequence: cached prefix blocks (a prefix-cache
hit, earlier chunks of a chunked prefill) and the new tokens, which the KV write kernel
stored before this launch. Query head h reads KV head h // group: K/V are never repeated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import dot_f32, next_pow2


@triton.jit
def _attend(q, acc, l_i, m_i, K, V, BT, seq, kv_head, q_pos, lo, hi, scale_log2,
            stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            DOT_F32: tl.constexpr, MASKED: tl.constexpr):
    """Fold keys [lo, hi) into the online softmax. Unmasked tiles (every key before every
    query of the tile, all inside the context) skip the bounds and causal masks."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        if MASKED:
            n_valid = pos < hi
            block = tl.load(BT + seq * stride_bt + pos // BLOCK_SIZE, mask=n_valid, other=0)
            kv_mask = n_valid[:, None] & d_valid[None, :]
        else:
            block = tl.load(BT + seq * stride_bt + pos // BLOCK_SIZE)
            kv_mask = d_valid[None, :]
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k = tl.load(K + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale_log2
        if MASKED:
            s = tl.where((pos[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


# The block-table width changes from step to step: no specialisation on it (no recompiles).
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    Q, K, V, O, BT, CU_Q, CTX, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    # The last query tiles see the most keys: launch them first, so the short ones fill
    # the tail of the grid.
    tile = tl.cdiv(q_len, BLOCK_M) - 1 - tl.program_id(0)
    if tile < 0:
        return
    ctx = tl.load(CTX + seq)
    cached = ctx - q_len

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    q_pos = cached + offs_m  # absolute position of each query

    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys before this tile's first query are seen by all its queries: whole tiles of them
    # need no mask. The rest, up to the tile's last query (causal), is masked.
    first_q = cached + tile * BLOCK_M
    full = (first_q // BLOCK_N) * BLOCK_N
    end = tl.minimum(ctx, first_q + BLOCK_M)
    acc, l_i, m_i = _attend(q, acc, l_i, m_i, K, V, BT, seq, kv_head, q_pos, 0, full, scale_log2,
                            stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
                            HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_F32, False)
    acc, l_i, m_i = _attend(q, acc, l_i, m_i, K, V, BT, seq, kv_head, q_pos, full, end, scale_log2,
                            stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
                            HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_F32, True)

    out = acc / l_i[:, None]
    tl.store(O + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_q: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float,
    block_size: int, out: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """q [T, H, D] (the new tokens of all prefilling sequences, packed); k/v_cache
    [slots, Hkv, D] with slot = block * block_size + offset; block_tables [S, max_blocks];
    cu_q [S+1] query offsets; context_lens [S] cached + new tokens. Returns [T, H, D]."""
    T, H, D = q.shape
    Hkv = k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    S = context_lens.shape[0]
    if T == 0 or S == 0:
        return out
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1 and out.stride(-1) == 1
    block_m, block_n, warps, stages = config or _config(q)
    grid = (triton.cdiv(max_query_len, block_m), S, H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_q, context_lens, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        GROUP=H // Hkv, HEAD_DIM=D, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(D), DOT_F32=dot_f32(q),
        num_warps=warps, num_stages=stages,
    )
    return out


def _config(q: torch.Tensor) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if not q.is_cuda:
        return 64, 64, 4, 1  # the interpreter: small tiles keep the tests quick
    return PREFILL_CONFIG


# Tiles for the GPU, chosen with `bench/kernels.py --tune` on an H100 (bench/RESULTS.md).
PREFILL_CONFIG = (64, 64, 4, 2)


def prefill_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_q: torch.Tensor, context_lens: torch.Tensor, scale: float, block_size: int,
) -> torch.Tensor:
    """Plain torch, one sequence at a time: gather the context through the block table,
    repeat K/V per query head, causal softmax offset by the cached length. Computes in the
    dtype of q (call it with float64 tensors for a reference)."""
    T, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.empty_like(q)
    for s in range(context_lens.shape[0]):
        q0, q1 = int(cu_q[s]), int(cu_q[s + 1])
        n, ctx = q1 - q0, int(context_lens[s])
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].to(q.dtype).repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = v_cache[slots].to(q.dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k) * scale
        q_pos = torch.arange(n, device=q.device) + ctx - n
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
