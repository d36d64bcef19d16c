"""BlockManager and Scheduler bookkeeping, without a model."""
from __future__ import annotations

import pytest

from qwenkit.engine import block_manager as bm_module
from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.kv_cache import parse_memory
from qwenkit.engine.scheduler import Scheduler
from qwenkit.engine.sequence import Sequence, SequenceStatus
from qwenkit.sampling_params import SamplingParams

P = SamplingParams(max_tokens=4)


def computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose tokens were all computed (as after its prefill)."""
    seq = Sequence(tokens, P)
    bm.match_prefix(seq)
    n = len(tokens) - seq.num_cached_tokens
    assert bm.allocate(seq, n)
    seq.num_cached_tokens += n
    bm.cache_full_blocks(seq)
    return seq


def test_ref_counts_and_prefix_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, list(range(10)))  # blocks: [0-3] [4-7] [8-9 partial]
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.num_cached_blocks == 2
    b = Sequence(list(range(8)) + [99, 98], P)
    bm.match_prefix(b)
    assert b.num_cached_tokens == 8 and b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert (bm.prefix_cache_hits, bm.prefix_cache_misses) == (2, 2)  # a missed both blocks
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_at_least_one_token_is_recomputed() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, list(range(8)))
    bm.free(a)
    b = Sequence(list(range(8)), P)  # identical prompt: the last block must not be reused
    bm.match_prefix(b)
    assert b.num_cached_tokens == 4


def test_freed_cached_blocks_are_revived_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = computed(bm, [1, 2, 3, 4, 5])  # 2 full cached blocks + 1 partial
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = Sequence([1, 2, 3, 4, 7], P)
    bm.match_prefix(b)
    assert b.num_cached_tokens == 4  # revived from the free list
    bm.free(b)
    # Unhashed blocks are reused first, then the least recently freed cached one: [3, 4] goes
    # before [1, 2] because a sequence's tail blocks are freed first.
    c = computed(bm, [9, 9, 8, 8, 7])  # 3 blocks
    d = Sequence([1, 2, 3, 4, 0], P)
    bm.match_prefix(d)
    assert d.num_cached_tokens == 2
    bm.free(c)
    bm.free(d)
    assert bm.num_free_blocks == 4


def test_lru_keeps_the_hot_prefix() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    system = [1, 2, 3, 4]
    a = computed(bm, system + [10, 11, 12])
    bm.free(a)
    hot = Sequence(system + [20, 21, 22], P)
    bm.match_prefix(hot)
    assert hot.num_cached_tokens == 4
    bm.free(hot)  # the system blocks are now the most recently used
    filler = computed(bm, [30, 31, 32, 33, 34])  # needs 3 blocks: evicts older ones first
    bm.free(filler)
    again = Sequence(system + [40], P)
    bm.match_prefix(again)
    assert again.num_cached_tokens == 4


def test_hash_collision_is_verified_by_tokens(monkeypatch) -> None:
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=8, block_size=2)
    computed(bm, [1, 2, 3])
    b = Sequence([5, 6, 7], P)  # same (fake) hash, different tokens
    bm.match_prefix(b)
    assert b.num_cached_tokens == 0 and bm.prefix_cache_misses == 2  # a: 1, b: 1


def test_release_out_of_window_keeps_sinks() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    seq = computed(bm, list(range(20)))
    assert bm.release_out_of_window(seq, first_visible_pos=12, num_sink_blocks=1) == 5
    assert seq.block_table[0] >= 0 and seq.block_table[1:6] == [-1] * 5 and seq.block_table[6] >= 0
    assert bm.release_out_of_window(seq, first_visible_pos=12, num_sink_blocks=1) == 0
    bm.free(seq)
    assert bm.num_free_blocks == 16


def test_scheduler_budget_and_seq_cap() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    seqs = [Sequence(list(range(n)), P) for n in (3, 30, 5)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert out.seqs == seqs[:2] and out.num_new_tokens == [3, 7]  # chunked to the budget
    assert seqs[2].status is SequenceStatus.WAITING  # sequence cap
    sched.advance(out)
    seqs[0].append_token(1)
    out = sched.schedule()
    assert out.seqs == seqs[:2] and out.num_new_tokens == [1, 9]  # the decode goes first


def test_parse_memory() -> None:
    assert parse_memory("4GiB") == 4 * 2**30
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory(1000) == 1000
    assert parse_memory("1.5g") == 1_500_000_000
    with pytest.raises(ValueError, match="parse"):
        parse_memory("lots")
