"""AutoGPTQ / GPTQModel packing of integer weights and zero points (checkpoint format "gptq").

For `bits` in {4, 8}, `32 // bits` values share one int32, the first value in the lowest bits:

- qweight: int32 [in_features / pack, out_features]; row r holds input rows r*pack .. r*pack+pack-1.
- qzeros:  int32 [groups, out_features / pack]; packed along the output dim, stored as
  `zero - 1` (the historical off-by-one of AutoGPTQ's v1 format, which GPTQModel also writes).
- scales:  float16 [groups, out_features].
- g_idx:   int32 [in_features], the group of every input row.

weight[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
Plain torch only: no kiln imports.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def pack_factor(bits: int) -> int:
    return 32 // bits


def _shifts(bits: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] integers in [0, 2**bits) -> int32 [K / pack, N], packed along dim 0."""
    pf = pack_factor(bits)
    k, n = values.shape
    if k % pf:
        raise ValueError(f"{k} rows cannot be packed {pf} per int32")
    v = values.to(torch.int64).view(k // pf, pf, n) << _shifts(bits).to(torch.int64).view(1, pf, 1)
    packed = v.sum(dim=1)  # disjoint bit fields: sum == bitwise or
    return (packed - ((packed >= 2**31).to(torch.int64) << 32)).to(torch.int32)  # as signed int32


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K / pack, N] -> int32 [K, N] values in [0, 2**bits)."""
    pf = pack_factor(bits)
    rows, n = packed.shape
    mask = (1 << bits) - 1
    v = (packed.unsqueeze(1) >> _shifts(bits, packed.device).view(1, pf, 1)) & mask
    return v.reshape(rows * pf, n)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] integers -> int32 [G, N / pack], packed along dim 1."""
    return pack_rows(values.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits).t().contiguous()


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [G, N] -> qzeros in the v1 layout (stored minus one, wrapped to `bits`)."""
    return pack_cols((zeros.to(torch.int64) - 1) & ((1 << bits) - 1), bits)


def unpack_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    return (unpack_cols(qzeros, bits) + 1) & ((1 << bits) - 1)
