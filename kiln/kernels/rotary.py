"""Rotary position embedding (Hugging Face's "rotate half" layout) applied to q and k in
place, both in one launch: one token per program, all its heads at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, POS, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS + pos * stride_c + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + pos * stride_c + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    mq = (hq[:, None] < HQ) & (offs[None, :] < HALF)
    p1 = Q + t * stride_qt + hq[:, None] * stride_qh + offs[None, :]
    x1 = tl.load(p1, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mq, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=mq)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=mq)

    hk = tl.arange(0, BLOCK_HK)
    mk = (hk[:, None] < HK) & (offs[None, :] < HALF)
    p2 = K + t * stride_kt + hk[:, None] * stride_kh + offs[None, :]
    y1 = tl.load(p2, mask=mk, other=0.0).to(tl.float32)
    y2 = tl.load(p2 + HALF, mask=mk, other=0.0).to(tl.float32)
    tl.store(p2, (y1 * cos - y2 * sin).to(K.dtype.element_ty), mask=mk)
    tl.store(p2 + HALF, (y2 * cos + y1 * sin).to(K.dtype.element_ty), mask=mk)


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor) -> None:
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous; rows may be strided views of a fused
    qkv output); cos/sin [max_positions, D/2]; positions [T]."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if T == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    _rotary_kernel[(T,)](
        q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HQ=Hq, HK=Hk, HALF=D // 2, BLOCK_HQ=next_pow2(Hq), BLOCK_HK=next_pow2(Hk), BLOCK_HALF=next_pow2(D // 2),
    )


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Out of place, in the dtype of x."""
    c = cos[positions].unsqueeze(1).to(x.dtype)
    s = sin[positions].unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
