"""Paged KV-cache bookkeeping: a pool of fixed-size blocks with reference counts and
prefix hashes, and per-sequence block tables.

Only indices live here; the tensors that hold keys and values belong to the backend.
A full block is keyed by a chained hash of its tokens (and of every token before it), so
sequences that share a prompt prefix share those blocks. Freed blocks keep their hash and
stay reusable as a cache hit until the pool needs them for something else (LRU order).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its contents are final


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first. Dict for O(1) removal on a hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached contents
                if self._by_hash.get(block.hash) == block_id:
                    del self._by_hash[block.hash]
                block.hash = None
            block.ref_count = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        # Reverse order: a sequence's tail blocks are the least likely to be shared, so they
        # are evicted first.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
            elif block.ref_count < 0:  # pragma: no cover - a bookkeeping bug
                raise AssertionError(f"block {block_id} freed twice")

    def chain_hashes(self, token_ids: Sequence[int], num_full_blocks: int, start: int = 0,
                     parent: int | None = None) -> list[int]:
        """Chained hashes of full blocks [start, num_full_blocks) of `token_ids`."""
        bs = self.block_size
        out = []
        for i in range(start, num_full_blocks):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            out.append(parent)
        return out

    def find_cached_prefix(self, token_ids: Sequence[int], salt: int | None = None) -> tuple[list[int], list[int]]:
        """Cached blocks for the longest block-aligned prefix of `token_ids`, always leaving
        at least one token to compute (its logits are needed). Takes no reference: call
        `take` once the caller commits. Returns (block ids, their chained hashes). `salt`
        starts the hash chain: KV computed under a LoRA adapter is only shared within it."""
        if not self.enable_prefix_caching:
            return [], []
        hits: list[int] = []
        hashes: list[int] = []
        for h in self.chain_hashes(token_ids, (len(token_ids) - 1) // self.block_size, parent=salt):
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            hashes.append(h)
        return hits, hashes

    def num_free_among(self, block_ids: Sequence[int]) -> int:
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def take(self, block_ids: Sequence[int]) -> None:
        """Add a reference to cached blocks (a prefix-cache hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_full_block(self, block_id: int, block_hash: int) -> None:
        """Publish a block whose tokens are all computed so later prompts can reuse it."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        block.hash = block_hash
        self._by_hash.setdefault(block_hash, block_id)


@dataclass
class BlockTable:
    """The blocks of one sequence, in order, and how many of them are published."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of the first len(hashes) full blocks

    def slot(self, position: int, block_size: int) -> int:
        return self.block_ids[position // block_size] * block_size + position % block_size
