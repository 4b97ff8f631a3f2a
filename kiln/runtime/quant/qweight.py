"""The in-memory form of a group-quantized weight, shared by the GPTQ quantizer, the
checkpoint reader/writer and the linear layers that execute it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .packing import SUPPORTED_BITS


@dataclass
class QuantizedWeight:
    """weight[n, k] = scales[g_idx[k], n] * (qint[n, k] - zeros[g_idx[k], n])."""

    qint: torch.Tensor  # uint8 [out, in], values in [0, 2**bits)
    scales: torch.Tensor  # float32 [groups, out] (values representable in float16)
    zeros: torch.Tensor  # int32 [groups, out], in [0, 2**bits)
    g_idx: torch.Tensor  # int32 [in], group of every input column
    bits: int
    group_size: int  # -1: one group per output row
    sym: bool = True

    @property
    def out_features(self) -> int:
        return self.qint.shape[0]

    @property
    def in_features(self) -> int:
        return self.qint.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.g_idx.long()
        s = self.scales.to(dtype)[g].t()  # [out, in]
        z = self.zeros[g].t().to(dtype)
        return (self.qint.to(dtype) - z) * s

    def split_out(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Split along the output dim (a fused qkv / gate_up into its checkpoint parts)."""
        parts = []
        for q, s, z in zip(self.qint.split(sizes, 0), self.scales.split(sizes, 1), self.zeros.split(sizes, 1)):
            parts.append(QuantizedWeight(q.contiguous(), s.contiguous(), z.contiguous(), self.g_idx,
                                         self.bits, self.group_size, self.sym))
        return parts

    @staticmethod
    def cat_out(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Concatenate along the output dim; the parts must share g_idx, bits and groups."""
        first = parts[0]
        for p in parts[1:]:
            if p.bits != first.bits or not torch.equal(p.g_idx, first.g_idx):
                raise ValueError("only weights with the same bits and g_idx can be fused")
        return QuantizedWeight(
            torch.cat([p.qint for p in parts]), torch.cat([p.scales for p in parts], 1),
            torch.cat([p.zeros for p in parts], 1), first.g_idx, first.bits, first.group_size,
            all(p.sym for p in parts),
        )


def num_groups(in_features: int, group_size: int) -> int:
    """ceil(K / group_size): the last group may be shorter (576 columns, groups of 128: 5)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: kiln runs 4- and 8-bit GPTQ weights")


def default_act_dtype() -> torch.dtype:
    """The activation dtype of quantized layers on the CPU: bfloat16 (the fast kernels), or
    float32 with KILN_QUANT_ACT_DTYPE=float32 (slower; for exact comparisons, e.g. of a
    tensor-parallel engine against a single-process one)."""
    name = os.environ.get("KILN_QUANT_ACT_DTYPE", "bfloat16")
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"KILN_QUANT_ACT_DTYPE={name!r}: use bfloat16 or float32")
    return getattr(torch, name)
