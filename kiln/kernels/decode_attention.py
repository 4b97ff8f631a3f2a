"""Decode attention over the paged KV cache: one new query token per sequence.

Each program owns one sequence, one KV head and one split of its context. The query heads
of the KV group are handled together as the rows of one tile, so each K/V tile is loaded
once per group, not once per query head. Long contexts are split along the sequence
(flash-decoding): every split writes its normalised partial output and its log-sum-exp, and
a second, small kernel merges the splits. With one split the first kernel writes the output
directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import dot_f32, next_pow2

# Keys per inner iteration; a split covers a multiple of it.
BLOCK_N = 64
# The merge kernel reads up to this many splits per head (one compiled variant for all).
MAX_SPLITS = 64


# Values that change from step to step are not specialised on (no recompiles while serving).
@triton.jit(do_not_specialize=["part_size", "num_splits", "stride_bt"])
def _decode_kernel(
    Q, K, V, O, O_PART, LSE, BT, CTX, scale_log2, part_size, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_ks, stride_kh, stride_vs, stride_vh, stride_bt,
    SINGLE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CTX + seq)
    lo = split * part_size
    hi = tl.minimum(ctx, lo + part_size)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_valid = offs_g < GROUP
    d_valid = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    gd_mask = g_valid[:, None] & d_valid[None, :]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if lo < hi:
        q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        for start in range(lo, hi, BLOCK_N):
            pos = start + offs_n
            n_valid = pos < hi
            block = tl.load(BT + seq * stride_bt + pos // BLOCK_SIZE, mask=n_valid, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale_log2
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, input_precision="ieee").to(tl.float32)
            m_i = m_new

    if SINGLE:
        tl.store(O + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(O.dtype.element_ty), mask=gd_mask)
    else:
        # An empty split (past the end of this sequence) writes lse = -inf: weight 0.
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        row = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [B, H, S] index
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc / safe_l[:, None], mask=gd_mask)
        tl.store(LSE + row, tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf")), mask=g_valid)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    O, O_PART, LSE, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    row = (seq * tl.num_programs(1) + head) * num_splits + offs_s
    lse = tl.load(LSE + row, mask=s_valid, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    part = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(O + seq * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def num_splits_for(batch: int, num_kv_heads: int, max_context: int, num_sms: int = 132) -> int:
    """Split the context when batch x KV heads alone would leave most SMs idle, but keep
    each split at least a few key tiles long."""
    programs = max(1, batch * num_kv_heads)
    want = max(1, (2 * num_sms) // programs)
    most = max(1, triton.cdiv(max_context, 4 * BLOCK_N))
    return int(min(want, most, MAX_SPLITS))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, block_size: int, max_context: int,
    num_splits: int = 1, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D]; k/v_cache [slots, Hkv, D]; block_tables [B, max_blocks];
    context_lens [B] (each >= 1, including the new token, already in the cache);
    max_context: an upper bound of context_lens (fixed for a CUDA graph). Returns [B, H, D]."""
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    group = H // Hkv
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    part = triton.cdiv(triton.cdiv(max_context, min(num_splits, MAX_SPLITS)), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_context, part)
    if num_splits > 1:
        o_part = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    else:
        o_part = lse = out  # unused
    _decode_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, out, o_part, lse, block_tables, context_lens, scale * 1.4426950408889634, part, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        SINGLE=num_splits == 1, GROUP=group, HEAD_DIM=D, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_pow2(group)), BLOCK_N=BLOCK_N, BLOCK_D=next_pow2(D), DOT_F32=dot_f32(q),
    )
    if num_splits > 1:
        _merge_kernel[(B, H)](
            out, o_part, lse, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_S=MAX_SPLITS, BLOCK_D=next_pow2(D),
        )
    return out


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, block_size: int,
) -> torch.Tensor:
    """Plain torch, one sequence at a time, in the dtype of q (float64 for a reference)."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        pos = torch.arange(int(context_lens[b]), device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].to(q.dtype).repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = v_cache[slots].to(q.dtype).repeat_interleave(group, dim=1)
        p = (torch.einsum("hd,khd->hk", q[b], k) * scale).softmax(-1)
        out[b] = torch.einsum("hk,khd->hd", p, v)
    return out
