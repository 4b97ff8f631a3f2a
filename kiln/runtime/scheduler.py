"""Continuous batching. Plans in tokens, not phases: every running sequence has
`num_computed_tokens`, and each step hands some tokens to each sequence under one budget.
A prefill, a chunk of a long prefill, a decode and a prefix-cache hit are the same thing
seen with different numbers.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .kv_cache import BlockPool, BlockTable
from .request import Request


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Engine-side state of one request."""

    request: Request
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    block_table: BlockTable = field(default_factory=BlockTable)
    status: SeqStatus = SeqStatus.WAITING
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    adapter: Any = None  # a runtime.lora.Adapter held for this request, or None

    @property
    def cache_salt(self) -> int | None:
        return self.adapter.cache_salt if self.adapter is not None else None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_loras: int = 0  # distinct LoRA adapters in the running batch; 0: no limit
    # Off: a waiting sequence is admitted only when all its tokens fit in the step's budget
    # (static-shape backends encode a prompt whole).
    chunked_prefill: bool = True


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # in execution order
    num_new_tokens: list[int]  # tokens computed this step, per sequence
    preempted: list[Sequence]

    def __len__(self) -> int:
        return len(self.seqs)


class RequestTooLargeError(ValueError):
    pass


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        if config.max_num_batched_tokens < 1 or config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that could not complete even with the whole cache to itself
        (it would otherwise wait or be preempted forever)."""
        need = self.pool.blocks_needed(num_prompt_tokens + max_tokens)
        if need > self.pool.num_blocks:
            raise RequestTooLargeError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs "
                f"{need} KV-cache blocks of {self.pool.block_size} tokens, but the cache has "
                f"only {self.pool.num_blocks}; shorten the prompt or max_tokens, or give the "
                f"server a larger --kv-cache-bytes"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.request.params.max_tokens)
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        preempted: list[Sequence] = []

        # 1. Running sequences first, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.pool.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table.block_ids)
            while need > self.pool.num_free:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            if need > 0:
                seq.block_table.block_ids.extend(self.pool.allocate(need))
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1

        # 2. Admit waiting sequences (none while we are short of blocks), in arrival order; a
        # request whose adapter would exceed max_loras waits until one leaves the batch.
        adapters = {id(s.adapter) for s in self.running if s.adapter is not None}
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if (seq.adapter is not None and self.config.max_loras
                    and id(seq.adapter) not in adapters and len(adapters) >= self.config.max_loras):
                break
            hits, hashes = self.pool.find_cached_prefix(seq.token_ids, seq.cache_salt)
            num_cached = len(hits) * self.pool.block_size
            n = min(seq.num_tokens - num_cached, budget)
            if n < seq.num_tokens - num_cached and not self.config.chunked_prefill:
                break
            need = self.pool.blocks_needed(num_cached + n) - len(hits)
            if need + self.pool.num_free_among(hits) > self.pool.num_free:
                break
            self.waiting.popleft()
            self.pool.take(hits)
            self.pool.record_lookup(seq.num_tokens, num_cached)
            seq.block_table = BlockTable(hits + self.pool.allocate(need), list(hashes))
            seq.num_computed_tokens = num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_prompt_tokens = num_cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if seq.adapter is not None:
                adapters.add(id(seq.adapter))
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts, preempted)

    def _preempt(self, seq: Sequence) -> None:
        """Free everything the sequence holds; it is recomputed from its tokens later
        (published blocks usually come back as prefix-cache hits)."""
        self.pool.free(seq.block_table.block_ids)
        seq.block_table = BlockTable()
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and publish blocks that became full."""
        bs = self.pool.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            table = seq.block_table
            full = seq.num_computed_tokens // bs
            if full > len(table.hashes) and self.pool.enable_prefix_caching:
                parent = table.hashes[-1] if table.hashes else seq.cache_salt
                new = self.pool.chain_hashes(seq.token_ids, full, len(table.hashes), parent)
                for index, h in enumerate(new, start=len(table.hashes)):
                    self.pool.cache_full_block(table.block_ids[index], h)
                table.hashes.extend(new)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.pool.free(seq.block_table.block_ids)
        seq.block_table = BlockTable()
        seq.status = SeqStatus.FINISHED
