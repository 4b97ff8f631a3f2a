"""Weight-only int8 matmul: y = x @ (q * scale[:, None])^T, q int8 [N, K], one scale per
output channel. The int8 tile is converted in registers, so only 1 byte per weight is read.
Imports only torch and triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def int8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain torch, float32: the definition the kernel is tested against."""
    w = qweight.float() * scales.float()[:, None]
    return (x.float() @ w.t()).to(x.dtype)


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # [BLOCK_K, BLOCK_N]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float32 / float16 / bfloat16), qweight int8 [N, K], scales [N] -> [M, N]."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, 64))
    _int8_matmul_kernel[grid](
        x, qweight, scales, y, M, N, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64,
        # Triton's CPU interpreter multiplies 16-bit floats as raw bits: use float32 there.
        DOT_F32=(x.dtype == torch.float32 or not x.is_cuda),
    )
    return y
