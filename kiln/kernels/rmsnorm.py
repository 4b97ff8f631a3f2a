"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer:
residual' = x + residual; y = residual' / rms(residual') * weight. One row per program,
statistics in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2


@triton.jit
def _rmsnorm_kernel(
    X, R, W, Y, R_OUT, eps, stride_x, stride_r, stride_y, stride_ro,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(R_OUT.dtype.element_ty)  # the residual stream keeps the model's dtype
        tl.store(R_OUT + row * stride_ro + offs, x, mask=mask)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, N]. Returns (normed, x + residual) when a residual is given, else (normed, None)."""
    T, N = x.shape
    y = torch.empty_like(x) if out is None else out
    r_out = None
    if residual is not None:
        r_out = torch.empty_like(x) if residual_out is None else residual_out
    if T:
        r = residual if residual is not None else x
        ro = r_out if r_out is not None else y
        _rmsnorm_kernel[(T,)](
            x, r, weight, y, ro, eps, x.stride(0), r.stride(0), y.stride(0), ro.stride(0),
            N=N, BLOCK=next_pow2(N), HAS_RESIDUAL=residual is not None,
        )
    return y, r_out


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if residual is not None:
        x = x + residual
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)
    return y, (x if residual is not None else None)
