"""KV block allocation: reference counts plus automatic prefix caching.

A full block is identified by a chained hash, ``hash((parent_hash, token_ids))``, so equal hashes
mean equal prefixes up to collisions; every hit is verified by comparing the token ids. A block
whose reference count drops to zero keeps its hash and content and goes to the back of the free
list, so it can be revived by a later request until it is the least recently used free block and
gets reallocated (LRU eviction). Blocks without a hash go to the front (nothing to lose).
"""
from __future__ import annotations

from collections import OrderedDict

from qwenkit.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()

    def reset(self) -> None:
        self.ref_count = 1
        self.hash = None
        self.token_ids = ()


def chain_hash(parent: object, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


def block_parent(seq: Sequence, i: int, block_size: int, parent: object) -> object:
    """The parent key of block i, with the hashes of the images whose tokens fall in the block
    (vLLM's extra keys: image tokens are all one placeholder id, the image says what the KV holds)."""
    if seq.mm is None:
        return parent
    keys = seq.mm.block_keys(i * block_size, (i + 1) * block_size)
    return (parent, keys) if keys else parent


def root_hash(seq: Sequence) -> object:
    """Parent of a sequence's first block: KV written under another per-request YaRN table
    is another prefix (table 0, plain RoPE, keeps the unscaled hashes)."""
    return ("rope", seq.rope_factor_index) if seq.rope_factor_index else None


class BlockManager:
    """Owns `num_blocks` blocks of `block_size` token slots each.

    Contract with the scheduler: `allocate` before a step (it never evicts blocks in use),
    `cache_full_blocks` after the step wrote the KV, `free` when a sequence ends or is preempted.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Free blocks in eviction order (front = next to be reused).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_cache_hits = 0  # full prompt blocks found in the cache
        self.prefix_cache_misses = 0  # full prompt blocks looked up and not found

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block_id)

    @property
    def prefix_cache_hit_rate(self) -> float:
        total = self.prefix_cache_hits + self.prefix_cache_misses
        return self.prefix_cache_hits / total if total else 0.0

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_cached_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    # ------------------------------------------------------------------ allocation
    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks holding a prefix of a sequence that owns no blocks yet.

        At least one token is always left to compute: the model must run on the last token to
        produce the logits of the next one. A sequence still computing prompt log-probs takes no
        hit (the cached positions would have no logits; vLLM bypasses the lookup the same way);
        its blocks are still cached for later requests.
        """
        assert not seq.block_table and seq.num_cached_tokens == 0
        if not self.enable_prefix_caching:
            return
        if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
            return
        bs = self.block_size
        num_full = (len(seq) - 1) // bs
        parent = root_hash(seq)
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(block_parent(seq, i, bs, parent), tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                self.prefix_cache_misses += num_full - i
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            seq.num_cached_tokens += bs
            self.prefix_cache_hits += 1
            parent = h
        if seq.num_output_tokens == 0:
            seq.num_prefix_cached_tokens = seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens; False (and no change) if short."""
        need = self.num_blocks_needed(seq, num_new_tokens)
        if need > len(self.free_block_ids):
            return False
        for _ in range(need):
            seq.block_table.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]  # evict the least recently used cached block
        block.reset()
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed during the last step."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_cached_tokens // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = seq.block_hashes[i - 1] if i else root_hash(seq)
            h = chain_hash(block_parent(seq, i, bs, parent), tokens)
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if block_id < 0 or h in self.hash_to_block_id:
                continue  # released already, or an identical block is cached (keep that one)
            block = self.blocks[block_id]
            block.hash, block.token_ids = h, tokens
            self.hash_to_block_id[h] = block_id

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's `reset_prefix_cache`), e.g. after the weights changed:
        their KV was computed by the old weights. False (nothing done) while blocks are in use."""
        if any(b.ref_count for b in self.blocks):
            return False
        for b in self.blocks:
            b.hash, b.token_ids = None, ()
        self.hash_to_block_id.clear()
        return True

    # ------------------------------------------------------------------ release
    def _decref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None
            if block.hash is None:
                self.free_block_ids.move_to_end(block_id, last=False)

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq`. Tail blocks are freed first, so they are evicted first."""
        for block_id in reversed(seq.block_table):
            if block_id >= 0:
                self._decref(block_id)
        seq.block_table.clear()

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks holding the first `num_tokens` positions (speculative decoding
        gives back the room of rejected draft tokens). Trimmed blocks were never full and
        computed, so they carry no hash and go to the front of the free list."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block_id = seq.block_table.pop()
            if block_id >= 0:
                self._decref(block_id)

    def release_out_of_window(self, seq: Sequence, first_visible_pos: int, num_sink_blocks: int) -> int:
        """Release blocks wholly before `first_visible_pos`, except the first `num_sink_blocks`.

        Used when every layer slides: no present or future query can see those positions.
        Returns the number of blocks released.
        """
        start = num_sink_blocks + seq.num_released_blocks
        end = min(first_visible_pos // self.block_size, len(seq.block_table))
        for i in range(start, end):
            block_id = seq.block_table[i]
            if block_id >= 0:
                self._decref(block_id)
                seq.block_table[i] = -1
        released = max(0, end - start)
        seq.num_released_blocks += released
        return released
