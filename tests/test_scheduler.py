"""Block pool and scheduler on their own: budgets, chunking, preemption order, prefix
sharing and reference counts (no model needed)."""

from __future__ import annotations

import pytest

from kiln.runtime.kv_cache import BlockPool, NoFreeBlocksError
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.scheduler import RequestTooLargeError, Scheduler, SchedulerConfig, SeqStatus, Sequence


def seq(rid: str, n: int, max_tokens: int = 8, base: int = 0) -> Sequence:
    ids = [base + i for i in range(n)]
    return Sequence(Request(rid, ids, SamplingParams(temperature=0, max_tokens=max_tokens)), list(ids), n)


def run_step(s: Scheduler, new_token: int = 7):
    batch = s.schedule()
    s.after_step(batch)
    for q in batch.seqs:
        if q.num_computed_tokens == q.num_tokens:
            q.token_ids.append(new_token)
    return batch


def test_pool_allocate_free_and_refcounts():
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert pool.num_free == 1
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 4


def test_prefix_blocks_are_shared_and_survive_until_evicted():
    pool = BlockPool(8, 4)
    tokens = list(range(10))  # two full blocks + 2 tokens
    blocks = pool.allocate(3)
    for i, h in enumerate(pool.chain_hashes(tokens, 2)):
        pool.cache_full_block(blocks[i], h)
    hits, _ = pool.find_cached_prefix(tokens + [99])
    assert hits == blocks[:2]
    pool.take(hits)
    assert pool.blocks[blocks[0]].ref_count == 2
    pool.free(blocks)
    pool.free(hits)
    assert pool.num_free == 8
    # still cached after being freed ...
    assert pool.find_cached_prefix(tokens)[0] == blocks[:2]
    # ... until the pool hands the blocks out again
    pool.allocate(8)
    assert pool.find_cached_prefix(tokens)[0] == []


def test_prefix_lookup_leaves_one_token_to_compute():
    pool = BlockPool(8, 4)
    tokens = list(range(8))  # exactly two blocks
    blocks = pool.allocate(2)
    for i, h in enumerate(pool.chain_hashes(tokens, 2)):
        pool.cache_full_block(blocks[i], h)
    assert pool.find_cached_prefix(tokens)[0] == blocks[:1]


def test_chained_hash_depends_on_the_whole_prefix():
    pool = BlockPool(8, 2)
    assert pool.chain_hashes([1, 2, 3, 4], 2)[1] != pool.chain_hashes([9, 9, 3, 4], 2)[1]


def test_token_budget_chunks_long_prompts_and_interleaves_decodes():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=8), BlockPool(64, 4))
    short = seq("short", 3)
    long = seq("long", 25)
    s.add(short)
    s.add(long)
    b = run_step(s)
    assert sum(b.num_new_tokens) <= 10 and b.num_new_tokens == [3, 7]
    b = run_step(s)
    # the short request decodes while the long one continues its prefill
    assert [q.request_id for q in b.seqs] == ["short", "long"] and b.num_new_tokens == [1, 9]
    b = run_step(s)
    assert b.num_new_tokens == [1, 9]
    assert long.num_computed_tokens == 25 and long.num_tokens == 26


def test_max_num_seqs_caps_the_running_batch():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=2), BlockPool(64, 4))
    for i in range(4):
        s.add(seq(f"r{i}", 3))
    b = run_step(s)
    assert len(b.seqs) == 2 and len(s.waiting) == 2


def test_preemption_takes_the_newest_and_frees_its_blocks():
    pool = BlockPool(6, 4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8), pool)
    old, new = seq("old", 8, max_tokens=12), seq("new", 8, max_tokens=12, base=100)
    s.add(old)
    s.add(new)
    run_step(s)  # both prefilled: 2 blocks each, 2 free
    for _ in range(8):
        b = run_step(s)
        if b.preempted:
            break
    assert [q.request_id for q in b.preempted] == ["new"]
    assert new.status is SeqStatus.WAITING and new.num_computed_tokens == 0
    assert new.block_table.block_ids == [] and s.waiting[0] is new
    assert old.status is SeqStatus.RUNNING
    s.finish(old)
    b = run_step(s)
    assert b.seqs == [new]  # readmitted and recomputed
    s.finish(new)
    assert pool.num_free == pool.num_blocks


def test_a_request_that_can_never_fit_is_refused():
    s = Scheduler(SchedulerConfig(), BlockPool(4, 4))
    with pytest.raises(RequestTooLargeError, match="needs 5 KV-cache blocks"):
        s.add(seq("big", 12, max_tokens=8))
    assert not s.has_work
