"""Weight-only int8: symmetric, one scale per output channel, applied at load time
(`kiln serve --quantize int8`).

CPU: torch's int8 weight-only GEMV (`torch._weight_int8pack_mm`) with bfloat16 activations
(its float32 path is several times slower than a float32 GEMM); batches past GEMV_MAX_ROWS (32)
dequantize into bfloat16 and run one GEMM. CUDA: the Triton kernel in kiln.kernels.int8_matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Measured on AVX-512 (bench/quant.py --kernels): the GEMV kernel wins up to ~32 rows.
GEMV_MAX_ROWS = 32


def quantize_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16,
                         amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], scales [out]) with w ~= q * scale, |q| <= 127.
    The scale is rounded to `scale_dtype` first so that q * scale is exactly what runs.
    `amax` [out]: the rows' absolute maxima when `weight` is only some columns of them."""
    w = weight.detach().float()
    if amax is None:
        amax = w.abs().amax(dim=1)
    scale = (amax / 127.0).clamp(min=1e-12).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, act_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if act_dtype is None:
            from .qweight import default_act_dtype

            act_dtype = default_act_dtype()
        self.out_features, self.in_features = qweight.shape
        self.act_dtype = act_dtype
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(act_dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor, amax: torch.Tensor | None = None) -> "Int8Linear":
        q, s = quantize_per_channel(weight, amax=amax)
        return cls(q, s)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            from ...kernels.int8_matmul import int8_matmul

            y = int8_matmul(x2, self.qweight, self.scales)
        else:
            xa = x2.to(self.act_dtype)
            if xa.shape[0] <= GEMV_MAX_ROWS:
                y = torch._weight_int8pack_mm(xa.contiguous(), self.qweight, self.scales)
            else:
                y = F.linear(xa, self.dequantize(self.act_dtype))
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"
