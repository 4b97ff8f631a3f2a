"""SwiGLU activation: silu(gate) * up, from the fused gate_up projection [T, 2I] -> [T, I]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_kernel(GU, O, stride_gu, stride_o, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_gu + N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + row * stride_o + offs, (g * tl.sigmoid(g) * u).to(O.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [T, 2N] (gate first, as the fused projection lays it out) -> [T, N]."""
    T, two_n = gate_up.shape
    n = two_n // 2
    if out is None:
        out = torch.empty(T, n, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = 1024
        _swiglu_kernel[(T, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), N=n, BLOCK=block)
    return out


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
