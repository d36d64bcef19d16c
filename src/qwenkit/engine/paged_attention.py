"""Attention over the paged KV cache: the engine's `attn_metadata` for one step.

The step's tokens arrive as one flat stream (the model sees B=1, T=N). Sequences are split into
two groups by query length: decodes (one query each) and prefill chunks. Per layer, the new K/V
are written with one `index_copy_` over `slot_mapping`. On CPU (fp32, head_dim 64 / 128) each
group whose queries see all their keys then runs `ops.paged_attention`: one C kernel for every
query row, decode or prefill, reading the pool in place, each row over exactly its keys
0..position with the same arithmetic. So a row's result does not depend on how its prompt was
chunked, on a prefix-cache hit, or on the other sequences of the step (batch-invariant, with
the batch-invariant int8 / int4 GEMMs: the same request gives the same tokens whatever else runs).
Otherwise (GPU, other head sizes, a sliding window or streaming window cutting keys off) the
group gathers the blocks holding its visible keys (one `index_select` over whole blocks), padded
to the longest chunk, and runs one SDPA call with an additive mask that trims them exactly;
those results can differ in the last bits with chunking and batching. All the index and mask
tensors are built once per step (and per distinct window), never per layer or per sequence in
Python.

An int8 cache (`kv_cache_dtype="int8"`) is written through `KVCache.write` (codes + one scale
per token and KV head); the C kernel reads the codes in place, the SDPA path dequantizes the
blocks it gathers (`KVCache.gather`), and so does dual chunk attention.

Visibility (HF semantics): key j is visible to query i iff j <= i and, for a layer with window W,
i - j < W. In streaming mode (StreamingLLM) the first `num_sink_tokens` positions stay visible as
well. Departure from the paper: positions are absolute, not re-numbered inside the cache; RoPE
only sees relative distances, so windowed keys keep their true distances (< W) and only the sink
keys sit "far away". This needs no re-rotation of cached keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenkit.cpu import ops
from qwenkit.cpu.decode_step import DecodeKV, decode_kv_ok
from qwenkit.engine.kv_cache import KVCache
from qwenkit.model.dca import DualChunkRope, dual_chunk_attention


@dataclass
class _KeyView:
    """Which pool blocks a group reads for one window size, and which (query, key) pairs count."""

    blocks: torch.Tensor  # (S * NB,) long: physical blocks to gather, NB per sequence
    mask: torch.Tensor  # (S, 1, Tq, NB * block_size) additive float mask: 0 visible, -inf not
    num_keys: int  # NB * block_size


class SequenceGroup:
    """Sequences of one step that share a padded query length `Tq`.

    Flat token `token_start + t` of the step is query t of some sequence; `token_index` maps the
    padded (S, Tq) grid back to flat tokens (padding repeats a sequence's last query, so every
    mask row has a visible key), and `out_index` picks the real rows of the padded output.
    Index arithmetic runs on CPU tensors; only the results move to `device` (no GPU syncs).
    """

    def __init__(
        self,
        token_start: int,
        query_lens: torch.Tensor,  # (S,) long, CPU
        context_lens: torch.Tensor,  # (S,) long, CPU: cached + new tokens after this step
        block_tables: torch.Tensor,  # (S, max_blocks) long, CPU, -1 = no block
        block_size: int,
        num_sink_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.num_seqs = int(query_lens.numel())
        self.query_lens = query_lens
        self.num_tokens = int(query_lens.sum())
        self.token_start = token_start
        self.tq = int(query_lens.max())
        self.context_lens = context_lens
        self.block_tables = block_tables.clamp(min=0)
        self.block_size = block_size
        self.num_sink_tokens = num_sink_tokens
        self.device = device
        self.dtype = dtype
        t = torch.arange(self.tq)
        t_clamped = torch.minimum(t[None, :], query_lens[:, None] - 1)  # (S, Tq)
        cu = torch.cumsum(query_lens, 0) - query_lens  # (S,) first flat token of each seq
        self.q_pos = (context_lens - query_lens)[:, None] + t_clamped  # (S, Tq)
        self.token_index = (token_start + cu[:, None] + t_clamped).to(device)  # (S, Tq)
        self.out_index = None
        if self.tq > 1:
            real = t[None, :] < query_lens[:, None]  # (S, Tq)
            self.out_index = torch.arange(self.num_seqs * self.tq)[real.flatten()].to(device)
        self._views: dict[tuple[int | None, bool], _KeyView] = {}

    def all_visible(self, window: int | None) -> bool:
        """Every query sees every cached key of its sequence (no window cuts any off; sink
        tokens only ever add visibility)."""
        return window is None or int(self.context_lens.max()) <= window

    def key_view(self, window: int | None, sinks: bool) -> _KeyView:
        key = (window, sinks)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._build_view(window, sinks)
        return view

    def _build_view(self, window: int | None, sinks: bool) -> _KeyView:
        """Whole blocks are gathered (one contiguous copy each); the mask trims them exactly.

        Per sequence: the sink blocks (streaming mode), then every block from the first one
        holding a key inside the window of the chunk's first query to the last written block.
        """
        bs = self.block_size
        n_sink = self.num_sink_tokens if sinks else 0
        sink_blocks = -(-n_sink // bs)
        ctx = self.context_lens  # (S,)
        last = (ctx - 1) // bs  # (S,) last logical block
        if window is None:
            first = torch.full_like(ctx, sink_blocks)
        else:
            first = ((self.q_pos[:, 0] - window + 1).clamp(min=0) // bs).clamp(min=sink_blocks)
        num_blocks = sink_blocks + int((last - first).max()) + 1
        j = torch.arange(num_blocks)[None, :]  # (1, NB)
        logical = torch.where(j < sink_blocks, j, first[:, None] + j - sink_blocks)  # (S, NB)
        logical = torch.minimum(logical, last[:, None])  # padding repeats the last block
        physical = self.block_tables.gather(1, logical)  # (S, NB)
        k_pos = (logical[:, :, None] * bs + torch.arange(bs)).flatten(1)  # (S, L)
        dup = torch.zeros_like(logical, dtype=torch.bool)
        dup[:, 1:] = logical[:, 1:] == logical[:, :-1]  # a repeated padding block counts once
        valid = (k_pos < ctx[:, None]) & ~dup.repeat_interleave(bs, dim=1)
        q = self.q_pos[:, :, None]  # (S, Tq, 1)
        kp = k_pos[:, None, :]  # (S, 1, L)
        visible = valid[:, None, :] & (kp <= q)  # (S, Tq, L)
        if window is not None:
            visible &= (q - kp < window) | (kp < n_sink)
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
        return _KeyView(
            blocks=physical.flatten().to(self.device),
            mask=mask[:, None].to(self.device),
            num_keys=num_blocks * bs,
        )


class PagedAttentionMetadata:
    """Implements the model's attention backend protocol over a `KVCache` for one step.

    `streaming_window` (StreamingLLM mode) caps every layer's window and keeps the first
    `num_sink_tokens` tokens visible.
    """

    def __init__(
        self,
        kv_cache: KVCache,
        slot_mapping: torch.Tensor,  # (N,) long
        groups: list[SequenceGroup],
        *,
        streaming_window: int | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.slot_mapping = slot_mapping
        self.groups = groups
        self.streaming_window = streaming_window

    def decode_kv(self, window: int | None) -> DecodeKV | None:
        """The fused decode step's view (`qwenkit.cpu.decode_step`) when the step is all
        decodes whose queries see every cached key (under `window`), else None."""
        if len(self.groups) != 1 or self.groups[0].tq != 1:
            return None
        g = self.groups[0]
        if self.streaming_window is not None:
            window = min(window or self.streaming_window, self.streaming_window)
        kv = self.kv_cache
        if not g.all_visible(window) or not decode_kv_ok(kv.k_cache) or self.slot_mapping.device.type != "cpu":
            return None
        return DecodeKV(kv.k_cache, kv.v_cache, self.slot_mapping.contiguous(), g.block_tables.contiguous(),
                        g.context_lens.contiguous(), kv.k_scale, kv.v_scale)  # fmt: skip

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        assert q.shape[0] == 1, "the engine runs a flat token stream (B=1)"
        q, k, v = q[0], k[0], v[0]  # (N, H, D)
        self.kv_cache.write(layer_idx, self.slot_mapping, k, v)  # (N, Hkv, D)

        window, sinks = sliding_window, False
        if self.streaming_window is not None:
            window = min(window or self.streaming_window, self.streaming_window)
            sinks = True
        outs = [self._attend_group(g, q, self.kv_cache, layer_idx, scale, window, sinks) for g in self.groups]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (N, Hq, D)
        return out.unsqueeze(0)

    def attend_dual_chunk(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: DualChunkRope,
        *,
        scale: float,
    ) -> torch.Tensor:
        """Dual chunk attention (`qwenkit.model.dca`): q/k arrive unrotated and the pool stores
        keys unrotated; each sequence's queries run over its gathered keys 0..context-1."""
        if self.streaming_window is not None:
            raise ValueError("dual chunk attention does not combine with streaming_window")
        assert q.shape[0] == 1, "the engine runs a flat token stream (B=1)"
        q, k, v = q[0], k[0], v[0]  # (N, H, D)
        kv = self.kv_cache
        kv.write(layer_idx, self.slot_mapping, k, v)
        out = torch.empty_like(q)
        for g in self.groups:
            row = g.token_start
            for s in range(g.num_seqs):
                n, ctx = int(g.query_lens[s]), int(g.context_lens[s])
                blocks = g.block_tables[s, : -(-ctx // g.block_size)].to(q.device)
                ks, vs = kv.gather(layer_idx, blocks)
                ks, vs = ks.flatten(0, 1)[:ctx], vs.flatten(0, 1)[:ctx]  # (ctx, Hkv, D)
                q_pos = torch.arange(ctx - n, ctx, device=q.device)
                out[row : row + n] = dual_chunk_attention(q[row : row + n], ks, vs, q_pos, rope, scale=scale)
                row += n
        return out.unsqueeze(0)

    @staticmethod
    def _attend_group(
        g: SequenceGroup,
        q: torch.Tensor,
        kv: KVCache,
        layer_idx: int,
        scale: float,
        window: int | None,
        sinks: bool,
    ) -> torch.Tensor:
        n_heads, head_dim = q.shape[1], q.shape[2]
        k_pool, v_pool = kv.k_cache[layer_idx], kv.v_cache[layer_idx]  # (blocks, bs, Hkv, D)
        if g.all_visible(window) and ops.enabled(q) and k_pool.is_cpu:
            # Every query sees all its keys: the C kernel reads the pool through the block
            # tables in place (no gather copy, no mask), the same arithmetic for every row;
            # an int8 pool's scales are folded into its dot products and softmax weights.
            out = ops.paged_attention(
                q[g.token_start : g.token_start + g.num_tokens], k_pool, v_pool, g.block_tables,
                g.context_lens, g.query_lens, scale=scale,
                k_scale=kv.k_scale[layer_idx] if kv.quantized else None,
                v_scale=kv.v_scale[layer_idx] if kv.quantized else None,
            )  # fmt: skip
            if out is not None:
                return out
        view = g.key_view(window, sinks)
        n_kv = k_pool.shape[2]
        shape = (g.num_seqs, view.num_keys, n_kv, head_dim)
        kg, vg = kv.gather(layer_idx, view.blocks)  # dequantized when the pool is int8
        kg = kg.view(shape).transpose(1, 2).to(q.dtype)  # (S, Hkv, L, D)
        vg = vg.view(shape).transpose(1, 2).to(q.dtype)
        if g.tq == 1:
            # Decode: fold the query heads of each KV head into the query axis (GQA without
            # repeating K/V): (S, Hkv, Hq/Hkv, D); they all share the sequence's mask row.
            qg = q[g.token_start : g.token_start + g.num_seqs].view(g.num_seqs, n_kv, -1, head_dim)
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=view.mask, scale=scale)
            return out.reshape(g.num_seqs, n_heads, head_dim)  # (S, Hq, D)
        qg = q[g.token_index].transpose(1, 2)  # (S, Hq, Tq, D)
        out = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=view.mask, scale=scale, enable_gqa=n_heads != n_kv
        )  # (S, Hq, Tq, D)
        out = out.transpose(1, 2).reshape(g.num_seqs * g.tq, n_heads, head_dim)
        return out[g.out_index] if g.out_index is not None else out  # (tokens, Hq, D)


def single_sequence_metadata(kv_cache: KVCache, start: int, n: int) -> PagedAttentionMetadata:
    """Attention metadata for tokens start..start+n-1 of one sequence laid out in blocks 0, 1, 2, …
    of `kv_cache` (no block manager): evaluation loops that run a text through the cache in
    chunks (perplexity with an int8 cache) and tests."""
    bs = kv_cache.block_size
    num_blocks = -(-(start + n) // bs)
    if num_blocks > kv_cache.num_blocks:
        raise ValueError(f"{start + n} tokens need {num_blocks} blocks; the KV cache has {kv_cache.num_blocks}")
    device = kv_cache.k_cache[0].device
    group = SequenceGroup(
        0, torch.tensor([n]), torch.tensor([start + n]), torch.arange(num_blocks)[None], bs, 0, device, kv_cache.dtype
    )
    return PagedAttentionMetadata(kv_cache, torch.arange(start, start + n, device=device), [group])
