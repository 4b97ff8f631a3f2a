"""KV write: scatter the new tokens' keys and values into their cache slots, one launch.

A negative slot skips the token (the padding rows of a captured CUDA graph)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2


@triton.jit
def _kv_write_kernel(
    K, V, KC, VC, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=mask)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [T, Hkv, D] (last dim contiguous) -> k/v_cache[slot_mapping[t]] ([slots, Hkv, D])."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _kv_write_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        NUM_HEADS=Hkv, HEAD_DIM=D, BLOCK_H=next_pow2(Hkv), BLOCK_D=next_pow2(D),
    )


def kv_write_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    k_cache[slot_mapping[keep]] = k[keep].to(k_cache.dtype)
    v_cache[slot_mapping[keep]] = v[keep].to(v_cache.dtype)
