"""GPTQ dequantize-and-multiply: y = x @ W^T with W in the AutoGPTQ / GPTQModel layout
(checkpoint format "gptq", v1 zero points):

    qweight int32 [K / (32 / bits), N]   bits-wide values packed along K, value j in bits j*bits..
    qzeros  int32 [groups, N / (32 / bits)]  packed along N, stored as zero - 1
    scales  float16 [groups, N];  g_idx int32 [K]: group of each input row (any order: act-order)
    W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

Groups may be shorter at the end (K = 576, group size 128): g_idx says where each row goes,
so no shape needs to divide. Weights are unpacked tile by tile in registers: 4-bit weights
are read at half a byte each. Imports only torch and triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def gptq_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                          scales: torch.Tensor, g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain torch, float32: unpack, dequantize, multiply."""
    pf, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, pf, 1)) & mask).reshape(-1, qweight.shape[1])  # [K, N]
    z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, pf)) & mask).reshape(qzeros.shape[0], -1)  # [G, N]
    z = (z + 1) & mask
    g = g_idx.long()
    w = (q - z[g]).float() * scales.float()[g]  # [K, N]
    return (x.float() @ w).to(x.dtype)


@triton.jit
def _gptq_matmul_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_zg, stride_zn, stride_sg, stride_sn,
    stride_ym, stride_yn,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        packed = tl.load(qw_ptr + (kk // PF)[:, None] * stride_qk + rn[None, :] * stride_qn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (packed >> ((kk % PF) * BITS)[:, None]) & MASK  # [BLOCK_K, BLOCK_N]
        g = tl.load(g_ptr + kk, mask=k_ok, other=0)
        zp = tl.load(qz_ptr + g[:, None] * stride_zg + (rn // PF)[None, :] * stride_zn,
                     mask=k_ok[:, None] & n_ok[None, :], other=0)
        z = ((zp >> ((rn % PF) * BITS)[None, :]) + 1) & MASK
        s = tl.load(s_ptr + g[:, None] * stride_sg + rn[None, :] * stride_sn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        w = (q - z).to(tl.float32) * s
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] -> [M, N] for a GPTQ weight (see the module docstring); bits 4 or 8."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the GPTQ kernel handles 4 and 8")
    M, K = x.shape
    N = scales.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, 64))
    _gptq_matmul_kernel[grid](
        x, qweight, qzeros, scales, g_idx, y, M, N, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
        BITS=bits, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32,
        DOT_F32=(x.dtype == torch.float32 or not x.is_cuda),
    )
    return y
