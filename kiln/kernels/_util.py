"""Small helpers shared by the kernels."""

from __future__ import annotations

import torch
import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def dot_f32(x: torch.Tensor) -> bool:
    """Whether tl.dot must run on float32 operands: Triton's CPU interpreter multiplies
    bfloat16 as raw bits, so there the operands (already rounded to bfloat16) are upcast.
    On a GPU the tensor cores take bfloat16 directly."""
    return x.dtype == torch.bfloat16 and not x.is_cuda
