"""The quantized-matmul Triton kernels against their plain-torch references.

Here (no GPU) they run under TRITON_INTERPRET=1 on CPU tensors; with KILN_TEST_CUDA=1 on a
CUDA machine the same cases run compiled. Inputs come from the real quantizers (int8 per
channel; GPTQ packing, act-order, a short last group)."""

from __future__ import annotations

import os

import torch

CUDA = os.environ.get("KILN_TEST_CUDA") == "1" and torch.cuda.is_available()
if not CUDA:
    # Must be set before triton compiles anything: @triton.jit reads it when it decorates.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kiln.kernels.gptq_matmul import gptq_matmul, gptq_matmul_reference  # noqa: E402
from kiln.kernels.int8_matmul import int8_matmul, int8_matmul_reference  # noqa: E402
from kiln.runtime.quant.checkpoint import packed_tensors  # noqa: E402
from kiln.runtime.quant.gptq import GptqConfig, gptq_quantize, rtn_quantize  # noqa: E402
from kiln.runtime.quant.int8 import quantize_per_channel  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("m,n,k", [(1, 192, 576), (5, 100, 70), (33, 128, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul(m, n, k, dtype):
    g = torch.Generator().manual_seed(m * n + k)
    q, s = quantize_per_channel(torch.randn(n, k, generator=g), torch.float32)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = x.double() @ (q.double() * s.double()[:, None]).t()
    out = int8_matmul(x.to(DEV), q.to(DEV), s.to(DEV))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    assert rel_err(int8_matmul_reference(x, q, s), ref) < tol


@pytest.mark.parametrize("m", [1, 7, 40])
@pytest.mark.parametrize("bits,group_size,desc_act,k", [
    (4, 128, False, 576),   # five groups, the last of 64 rows
    (4, 128, True, 576),    # act-order: g_idx not monotonic
    (4, -1, False, 256),
    (8, 64, True, 320),
])
def test_gptq_matmul(m, bits, group_size, desc_act, k):
    g = torch.Generator().manual_seed(m + k + bits)
    n = 192
    w = torch.randn(n, k, generator=g) * 0.05
    if desc_act:
        x_cal = torch.randn(256, k, generator=g) * torch.logspace(-1, 1, k)
        qw = gptq_quantize(w, 2 * x_cal.t() @ x_cal / 256, GptqConfig(bits=bits, group_size=group_size,
                                                                       desc_act=True, sym=False))
    else:
        qw = rtn_quantize(w, bits, group_size, sym=False)
    t = {name.split(".")[1]: v for name, v in packed_tensors("m", qw).items()}
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ qw.dequantize(torch.float64).t()  # kiln's own unpacking, independent of the kernel
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    assert rel_err(gptq_matmul_reference(x, *args, bits), ref) < 1e-5
    out = gptq_matmul(x.to(DEV), *(a.to(DEV) for a in args), bits)
    assert out.shape == (m, n)
    assert rel_err(out, ref) < 1e-5
