"""Segmented (SGMV / Punica-style) LoRA kernels: each row of a batch uses the adapter in the
slot named by its index (-1: the base model, no LoRA term).

    shrink:  t[i, :]          = x[i, :] @ A[idx[i]]            A [S, K, R]  -> t [T, R] float32
    expand:  y[i, off:off+N] += t[i, :] @ B[idx[i]] * scale    B [S, R, N]

Adapters are stacked per slot and their ranks padded to one R (padding is zeros, so it adds
nothing). `lora_indices` sorts the rows by slot once per step (on the device, no host sync):
each program then works on a block of rows of one slot, so one adapter's weights are read
once per block of its rows and not once per row. The grid covers the worst case (every row
in one slot); programs past their slot's rows exit at once. Shapes and the grid depend only
on T and S, never on which rows use which slot, so a CUDA graph can replay these kernels.
A and B may have any strides (rank-major storage passes A as a transposed view); `expand`
writes a column slice of y, so each part of a fused qkv / gate_up projection gets its own B.
Imports only torch and triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class LoraIndices:
    """Per-step row layout shared by every LoRA linear of a forward."""

    idx: torch.Tensor  # [T] int32: slot of each row, -1 = base model
    perm: torch.Tensor  # [T] int32: rows sorted by slot (base rows last)
    seg: torch.Tensor  # [S + 1] int32: perm[seg[s]:seg[s + 1]] are the rows of slot s
    num_slots: int


def lora_indices(idx: torch.Tensor, num_slots: int) -> LoraIndices:
    """Sort rows by slot. Pure device ops (no .item()), so it can run inside a graph capture."""
    key = torch.where(idx < 0, torch.full_like(idx, num_slots), idx).to(torch.int64)
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(num_slots + 1, device=idx.device, dtype=torch.int64)
    seg = torch.searchsorted(sorted_key, bounds)  # first row with slot >= s
    return LoraIndices(idx.to(torch.int32), perm.to(torch.int32), seg.to(torch.int32), num_slots)


# -- references ---------------------------------------------------------------------------


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row by row in the dtype of x (float64 in tests); base rows are zero."""
    out = torch.zeros(x.shape[0], a.shape[2], dtype=x.dtype if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    for i, s in enumerate(idx.tolist()):
        if s >= 0:
            out[i] = x[i].to(out.dtype) @ a[s].to(out.dtype)
    return out


def lora_expand_ref(t: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, y: torch.Tensor,
                    col_offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Returns a new y (same dtype) with the LoRA term added to the rows that have a slot."""
    y = y.clone()
    n = b.shape[2]
    for i, s in enumerate(idx.tolist()):
        if s >= 0:
            delta = (t[i].double() @ b[s].double()) * scale
            y[i, col_offset:col_offset + n] = (y[i, col_offset:col_offset + n].double() + delta).to(y.dtype)
    return y


# -- kernels ------------------------------------------------------------------------------


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, perm_ptr, seg_ptr, K, R,
    stride_xm, stride_xk, stride_as, stride_ak, stride_ar, stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    start = tl.load(seg_ptr + slot)
    end = tl.load(seg_ptr + slot + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:  # this slot has fewer rows: nothing to do
        return
    offs = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs < end
    rows = tl.load(perm_ptr + offs, mask=m_ok, other=0).to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + kk[:, None] * stride_ak + rr[None, :] * stride_ar,
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32))
        else:
            acc += tl.dot(x, a.to(x.dtype))
    tl.store(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr,
             acc.to(t_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, y_ptr, perm_ptr, seg_ptr, R, N, scale,
    stride_tm, stride_tr, stride_bs, stride_br, stride_bn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
):
    slot = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_ptr + slot)
    end = tl.load(seg_ptr + slot + 1)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    offs = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs < end
    rows = tl.load(perm_ptr + offs, mask=m_ok, other=0).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rr = tl.arange(0, BLOCK_R)
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        kr = r0 + rr
        r_ok = kr < R
        t = tl.load(t_ptr + rows[:, None] * stride_tm + kr[None, :] * stride_tr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_base + kr[:, None] * stride_br + rn[None, :] * stride_bn,
                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(t.to(tl.float32), b.to(tl.float32))
        else:
            acc += tl.dot(t.to(b.dtype), b)  # tensor cores take 16-bit operands
    y_ptrs = y_ptr + rows[:, None] * stride_ym + rn[None, :] * stride_yn
    mask = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def _block_m(T: int) -> int:
    return 16 if T <= 256 else 32  # tl.dot needs >= 16


def _dot_f32(x: torch.Tensor) -> bool:
    # Triton's CPU interpreter multiplies 16-bit floats as raw bits: use float32 there.
    return x.dtype == torch.float32 or not x.is_cuda


def lora_shrink(x: torch.Tensor, a: torch.Tensor, ind: LoraIndices, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [T, K], a [S, K, R] (any strides) -> t [T, R] float32; base rows are left as they are
    in `out` (zeros when it is allocated here)."""
    T, K = x.shape
    S, K2, R = a.shape
    assert K2 == K and S >= ind.num_slots, (tuple(x.shape), tuple(a.shape), ind.num_slots)
    if out is None:
        out = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    if T == 0 or ind.num_slots == 0:
        return out
    block_m = _block_m(T)
    block_r = max(16, min(64, triton.next_power_of_2(R)))
    grid = (ind.num_slots, triton.cdiv(T, block_m), triton.cdiv(R, block_r))
    _shrink_kernel[grid](
        x, a, out, ind.perm, ind.seg, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, DOT_F32=_dot_f32(x),
    )
    return out


def lora_expand(t: torch.Tensor, b: torch.Tensor, ind: LoraIndices, y: torch.Tensor,
                col_offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    """y[:, col_offset:col_offset + N] += t @ b[slot] * scale for rows with a slot, in place.
    t [T, R] (float32 from `lora_shrink`, or a column slice of it), b [S, R, N]."""
    T, R = t.shape
    S, R2, N = b.shape
    assert R2 == R and S >= ind.num_slots and col_offset + N <= y.shape[1], (tuple(t.shape), tuple(b.shape))
    if T == 0 or ind.num_slots == 0:
        return y
    ys = y[:, col_offset:col_offset + N]
    block_m = _block_m(T)
    block_n = 64
    block_r = max(16, min(64, triton.next_power_of_2(R)))
    grid = (ind.num_slots, triton.cdiv(T, block_m), triton.cdiv(N, block_n))
    _expand_kernel[grid](
        t, b, ys, ind.perm, ind.seg, R, N, float(scale),
        t.stride(0), t.stride(1), b.stride(0), b.stride(1), b.stride(2), ys.stride(0), ys.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT_F32=_dot_f32(b),
    )
    return y
