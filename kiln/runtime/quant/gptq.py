"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), round-to-nearest for comparison, and the GPTQ linear layer.

GPTQ quantizes a weight W [out, in] column by column, in the order given by act-order or
left to right, and pushes each column's rounding error onto the columns not yet quantized,
weighted by the inverse Hessian H = 2 X X^T of the layer's calibration inputs. Updates are
applied lazily: inside a block of columns at once, to the rest of the matrix once per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .packing import unpack_rows
from .qweight import QuantizedWeight, check_bits, default_act_dtype, num_groups


@dataclass
class GptqConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group per row
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    sym: bool = True
    damp_percent: float = 0.01  # dampening, as a share of the mean Hessian diagonal
    block_size: int = 128  # columns per lazy-update block

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 or >= 1, not {self.group_size}")
        if not 0 <= self.damp_percent < 1:
            raise ValueError("damp_percent must be in [0, 1)")


def _grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point of the min-max grid of x [rows, cols]."""
    maxq = 2**bits - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    # Scales are stored as float16 in the checkpoint: quantize against that exact value.
    scale = ((xmax - xmin) / maxq).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest with the same grid and groups as GPTQ (the baseline it must beat)."""
    check_bits(bits)
    w = weight.detach().float()
    out, k = w.shape
    gs = k if group_size == -1 else group_size
    maxq = 2**bits - 1
    qint = torch.empty(out, k, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, k, gs):
        cols = w[:, start:start + gs]
        scale, zero = _grid(cols, bits, sym)
        qint[:, start:start + gs] = _quant(cols, scale[:, None], zero[:, None], maxq).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    return QuantizedWeight(qint, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx,
                           bits, group_size, sym)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GptqConfig) -> QuantizedWeight:
    """Quantize weight [out, in] given H [in, in] (sum of 2 x x^T over calibration rows,
    any positive scale)."""
    config.validate()
    # The column loop is thousands of small ops: one thread is faster (20x on a busy 2-core host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, hessian, config)
    finally:
        torch.set_num_threads(threads)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, config: GptqConfig) -> QuantizedWeight:
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    out, k = W.shape
    maxq = 2**config.bits - 1
    gs = k if config.group_size == -1 else config.group_size

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if config.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    damp = config.damp_percent * torch.mean(torch.diag(H))
    H += damp * torch.eye(k)
    # Upper Cholesky factor of H^-1: row i holds the update coefficients of column i.
    hinv = _inverse_cholesky(H)

    qint = torch.zeros(out, k, dtype=torch.uint8)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = None
    bs = config.block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # The group's grid from its current (error-updated) weights.
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                scale, zero = _grid(group, config.bits, config.sym)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q = _quant(w, scale, zero, maxq)
            qint[:, col] = q.to(torch.uint8)
            e = (w - scale * (q - zero)) / hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]

    g_idx = torch.arange(k, dtype=torch.int32) // gs  # group of each column in quantization order
    if perm is not None:
        inv = torch.argsort(perm)
        qint = qint[:, inv]
        g_idx = g_idx[inv]
    return QuantizedWeight(qint.contiguous(), torch.stack(scales), torch.stack(zeros).to(torch.int32),
                           g_idx.contiguous(), config.bits, config.group_size, config.sym)


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding dampening if H is not positive definite."""
    extra = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + extra * torch.eye(H.shape[0]))
        if info == 0:
            inv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(inv, upper=True)
        extra = max(extra * 10, 1e-2 * float(torch.mean(torch.diag(H))))
    raise ValueError("the Hessian is not positive definite even after dampening")


class HessianAccumulator:
    """Sum of 2 x x^T over calibration rows, in float64 (the rows are many and small)."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.H.addmm_(x.t(), x, alpha=2.0)
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.H / max(self.rows, 1)).float()


# -- the linear layer ---------------------------------------------------------------------

# Batches of up to this many rows use torch's fused int4 GEMV kernel (about linear in rows);
# larger ones (prefill) dequantize the layer into a bfloat16 buffer and run one GEMM
# (bench/quant.py --kernels measures both).
GEMV_MAX_ROWS = 64
_INT4PACK_BLOCK_N = 64  # oneDNN/ATen CPU int4 layout (AVX-512): 64 output rows per block


class GptqLinear(nn.Module):
    """y = x W^T with W held as 4- or 8-bit groups, packed in memory.

    CPU, 4-bit: torch's int4 CPU layout (`_convert_weight_to_int4pack_for_cpu`), whose groups
    must be contiguous and a multiple of 32 columns. GPTQ groups of g columns map onto
    int4pack groups of gcd-like size g' in {256, 128, 64, 32} dividing both g and K, so a short
    last group (K=576, g=128) needs no padding. Act-order weights are stored with their columns
    sorted by group; the input is permuted to match (one gather per call).
    Everything else (8-bit, odd shapes) keeps the AutoGPTQ packing and dequantizes per call.
    CUDA: the Triton kernel in kiln.kernels.gptq_matmul.
    """

    def __init__(self, qw: QuantizedWeight, act_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        act_dtype = act_dtype or default_act_dtype()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size = qw.bits, qw.group_size
        self.act_dtype = act_dtype
        g_idx = qw.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        self.perm = None if torch.equal(perm, torch.arange(self.in_features)) else perm
        sorted_g = g_idx[perm]
        self.int4_group = _int4pack_group(sorted_g, self.in_features, self.out_features) if qw.bits == 4 else None
        if self.int4_group is not None:
            q = qw.qint[:, perm].to(torch.int32).contiguous()
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            chunk_groups = sorted_g[:: self.int4_group]
            scales = qw.scales[chunk_groups]  # [K / g', N]
            # int4pack computes (q - 8) * scale + zero.
            zero = (8 - qw.zeros[chunk_groups].float()) * scales
            self.register_buffer("int4pack", packed)
            self.register_buffer("scale_zero", torch.stack([scales, zero], -1).to(act_dtype).contiguous())
            if not torch.equal(_unpack_int4pack(packed, self.out_features, self.in_features), q.to(torch.uint8)):
                # Another CPU build may use another layout: keep the portable path.
                del self.int4pack, self.scale_zero
                self.int4_group = None
        if self.int4_group is None:
            from .packing import pack_rows

            self.register_buffer("qweight", pack_rows(qw.qint.t().to(torch.int32), qw.bits))
            self.register_buffer("scales", qw.scales.half())  # exact: checkpoints store float16
            self.register_buffer("zeros", qw.zeros.to(torch.int32))
            self.register_buffer("g_idx", qw.g_idx.to(torch.int32))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in the original column order."""
        if self.int4_group is not None:
            q = _unpack_int4pack(self.int4pack, self.out_features, self.in_features).to(dtype)
            sz = self.scale_zero.to(dtype).repeat_interleave(self.int4_group, dim=0)  # [K, N, 2]
            w = (q - 8) * sz[..., 0].t() + sz[..., 1].t()
            if self.perm is not None:
                w = w[:, torch.argsort(self.perm)]
            return w
        q = unpack_rows(self.qweight, self.bits).t().to(dtype)  # [out, in]
        g = self.g_idx.long()
        return (q - self.zeros[g].t().to(dtype)) * self.scales.to(dtype)[g].t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            from ...kernels.gptq_matmul import gptq_matmul

            y = gptq_matmul(x2, *self._gptq_tensors(x2.device))
            return y.view(*shape[:-1], self.out_features)
        xa = x2.to(self.act_dtype)
        if self.int4_group is not None:
            if self.perm is not None:
                xa = xa.index_select(1, self.perm)
            if xa.shape[0] <= GEMV_MAX_ROWS:
                y = torch._weight_int4pack_mm_for_cpu(xa.contiguous(), self.int4pack, self.int4_group, self.scale_zero)
            else:
                y = F.linear(xa, self._dequantize_sorted())
        else:
            y = F.linear(xa, self.dequantize(torch.float32).to(self.act_dtype))
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def _dequantize_sorted(self) -> torch.Tensor:
        """int4pack weights in their stored (group-sorted) column order, as act_dtype."""
        n, k, g = self.out_features, self.in_features, self.int4_group
        q = _unpack_int4pack(self.int4pack, n, k).view(n, k // g, g).to(self.act_dtype)
        s, z = self.scale_zero[..., 0].t().unsqueeze(-1), self.scale_zero[..., 1].t().unsqueeze(-1)
        return torch.addcmul(z, q - 8, s).reshape(n, k)

    def _gptq_tensors(self, device: torch.device):
        cached = getattr(self, "_cuda_cache", None)
        if cached is None:
            # AutoGPTQ layout for the Triton kernel (built once, from whichever CPU form we hold).
            from .packing import pack_rows, pack_zeros

            qw = _requantize_from_buffers(self)
            cached = self._cuda_cache = tuple(t.to(device) for t in (
                pack_rows(qw.qint.t().to(torch.int32), qw.bits), pack_zeros(qw.zeros, qw.bits),
                qw.scales.half(), qw.g_idx.to(torch.int32))) + (self.bits,)
        return cached

    def extra_repr(self) -> str:
        path = f"int4pack g'={self.int4_group}" if self.int4_group else "dequantize per call"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}, cpu={path}")


class ConcatLinear(nn.Module):
    """Linear layers side by side along the output dim: a fused qkv / gate_up whose parts
    could not be fused (their act-order permutations differ)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])


def _int4pack_group(sorted_g: torch.Tensor, k: int, n: int) -> int | None:
    """The largest int4pack group size whose chunks each lie inside one GPTQ group."""
    if n % _INT4PACK_BLOCK_N:
        return None
    for g in (256, 128, 64, 32):
        if k % g == 0:
            chunks = sorted_g.view(k // g, g)
            if torch.equal(chunks[:, 0], chunks[:, -1]):
                return g
    return None


def _unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu` on AVX-512 builds: per block of 64
    output rows, byte [k, d] holds row d in its low nibble and row d + 32 in its high one."""
    b = _INT4PACK_BLOCK_N
    v = packed.view(n // b, k, b // 2)
    both = torch.stack([v & 15, v >> 4], dim=1)  # uint8 [blocks, 2, K, 32]
    return both.permute(0, 1, 3, 2).reshape(n, k)


def _requantize_from_buffers(layer: GptqLinear) -> QuantizedWeight:
    """Recover (qint, scales, zeros, g_idx) from a layer's buffers (for the CUDA upload)."""
    if layer.int4_group is None:
        return QuantizedWeight(unpack_rows(layer.qweight, layer.bits).t().to(torch.uint8),
                               layer.scales.float(), layer.zeros, layer.g_idx, layer.bits, layer.group_size)
    n, k, g = layer.out_features, layer.in_features, layer.int4_group
    q_sorted = _unpack_int4pack(layer.int4pack, n, k).to(torch.int32)
    s = layer.scale_zero[..., 0].float()  # [K/g', N]
    zero = torch.round(8 - layer.scale_zero[..., 1].float() / s.clamp(min=1e-30))
    perm = layer.perm if layer.perm is not None else torch.arange(k)
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k) // g)[inv].to(torch.int32)
    return QuantizedWeight(q_sorted[:, inv].to(torch.uint8), s, zero.to(torch.int32), g_idx, 4, layer.group_size)
