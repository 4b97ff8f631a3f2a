"""What every backend receives: the layout of one step's flat batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSlice:
    """A sequence computing more than one token this step."""

    query_start: int  # offset of its first new token in the flat batch
    query_len: int
    context_len: int  # tokens it attends to, cached ones plus the new ones
    block_ids: torch.Tensor  # [ceil(context_len / block_size)]


@dataclass
class AttentionMetadata:
    """The flat batch is laid out decodes first (one new token each), then prefills."""

    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    num_decode: int
    decode_context_lens: torch.Tensor  # [num_decode]
    decode_block_tables: torch.Tensor  # [num_decode, max blocks], padded with 0
    prefills: list[PrefillSlice]


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
