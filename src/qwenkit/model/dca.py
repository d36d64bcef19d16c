"""Dual Chunk Attention (DCA: ChunkLlama; Qwen2.5-1M's `dual_chunk_attention_config`).

A model trained on a window of `chunk_size` positions reads longer sequences by never letting a
query see a relative position larger than `chunk_size`. The sequence is cut into chunks of
`chunk_len = chunk_size - local_size` tokens; keys sit at position ``j % chunk_len`` and a query
at position ``p`` (chunk ``c = p // chunk_len``) is rotated three ways, one per key relation
(vLLM's `DualChunkRotaryEmbedding` tables):

* intra (keys of chunk c, causal):        ``q = p % chunk_len``                 (true distance)
* successive (keys of chunk c - 1):       ``q = min(p % chunk_len + chunk_len, chunk_size)``
* inter (keys of chunks < c - 1):         ``q = min(2 * chunk_len - 1, chunk_size)`` (constant)

The three partial softmaxes are merged by log-sum-exp, so the result is one softmax over every
visible key with per-pair positions. With `original_max_position_embeddings` L0 > 0 each query's
logits are scaled by ``max(1, 0.1 * ln(L / L0) + 1)`` (Qwen2.5-1M's length temperature). vLLM
takes L per request step and folds it into the keys as they are written; here L is the query's
own context length (position + 1), which keeps prefill(N) + decode equal to prefill(N + 1) and
results independent of chunked prefill.

Keys and queries reach this module unrotated (the model skips its RoPE pass when DCA is on), and
the engine's KV cache stores them unrotated: the rotation depends on the (query, key) relation.
Memory is bounded: queries run in blocks of at most `block_q` rows and inter-chunk keys in blocks
of `block_k`, merged online, so no (T x T) score matrix is built.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from qwenkit.model.layers import rotate

logger = logging.getLogger(__name__)

_FIELDS = ("chunk_size", "local_size", "original_max_position_embeddings")


@dataclass(frozen=True)
class DualChunkConfig:
    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0  # > 0: the per-query length temperature is on

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"dual_chunk_attention: {name} must be an integer, got {value!r}")
        if self.chunk_size < 2:
            raise ValueError(f"dual_chunk_attention: chunk_size must be >= 2, got {self.chunk_size}")
        if not 0 <= self.local_size < self.chunk_size:
            raise ValueError(
                f"dual_chunk_attention: local_size must be in [0, chunk_size={self.chunk_size}), "
                f"got {self.local_size}"
            )
        if self.original_max_position_embeddings < 0:
            raise ValueError(
                "dual_chunk_attention: original_max_position_embeddings must be >= 0, "
                f"got {self.original_max_position_embeddings}"
            )

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DualChunkConfig:
        """HF `dual_chunk_attention_config` (unknown keys such as the sparse-attention settings
        are ignored with a log line: this implementation is dense)."""
        missing = [k for k in ("chunk_size", "local_size") if k not in d]
        if missing:
            raise ValueError(f"dual_chunk_attention: missing {', '.join(missing)} (got {dict(d)!r})")
        extra = sorted(set(d) - set(_FIELDS))
        if extra:
            logger.info("dual_chunk_attention: ignoring %s (dense DCA only)", ", ".join(extra))
        return cls(**{k: _as_int(k, d[k]) for k in _FIELDS if k in d})


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"dual_chunk_attention: {name} must be an integer, got {value!r}") from None
    return value


def parse_dual_chunk_attention(
    value: str | Mapping[str, Any] | DualChunkConfig | None,
) -> DualChunkConfig | None:
    """``"chunk_size=2048,local_size=256"`` (CLI), a JSON object, a dict or a config -> config."""
    if value is None or isinstance(value, DualChunkConfig):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"dual_chunk_attention: invalid JSON {text!r} ({e})") from None
        else:
            items = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, val = part.partition("=")
                if not sep or key.strip() not in _FIELDS:
                    raise ValueError(
                        f"dual_chunk_attention: expected key=value pairs with keys {', '.join(_FIELDS)}; "
                        f"got {part!r} in {text!r}"
                    )
                items[key.strip()] = val.strip()
            value = items
    if not isinstance(value, Mapping):
        raise ValueError(f"dual_chunk_attention: expected a mapping or 'key=value,...', got {value!r}")
    return DualChunkConfig.from_dict(value)


# ---------------------------------------------------------------------- position tables
def key_positions(pos: torch.Tensor, cfg: DualChunkConfig) -> torch.Tensor:
    return pos % cfg.chunk_len


def query_positions(pos: torch.Tensor, cfg: DualChunkConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intra, successive, inter) rotary positions of queries at absolute positions `pos`."""
    cl = cfg.chunk_len
    intra = pos % cl
    succ = (intra + cl).clamp(max=cfg.chunk_size)
    inter = torch.full_like(pos, min(2 * cl - 1, cfg.chunk_size))
    return intra, succ, inter


def length_temperature(pos: torch.Tensor, cfg: DualChunkConfig) -> torch.Tensor | None:
    """Per-query logit scale max(1, 0.1 ln(L / L0) + 1) with L = pos + 1; None when off."""
    l0 = cfg.original_max_position_embeddings
    if l0 <= 0:
        return None
    return (0.1 * torch.log((pos + 1).double() / l0) + 1.0).clamp(min=1.0).float()


@dataclass
class DualChunkStats:
    """Instrumentation: the extreme (query - key) rotary distances ever multiplied."""

    max_relative_position: int = -1
    min_relative_position: int = 1 << 62
    calls: int = 0

    def update(self, qp: torch.Tensor, kp: torch.Tensor, mask: torch.Tensor | None) -> None:
        rel = qp[:, None] - kp[None, :]
        if mask is not None:
            rel = rel[mask]
        if rel.numel():
            self.max_relative_position = max(self.max_relative_position, int(rel.max()))
            self.min_relative_position = min(self.min_relative_position, int(rel.min()))


class DualChunkRope(nn.Module):
    """The model's DCA state: config, a cos/sin table over rotary positions 0..chunk_size, and
    optional instrumentation (`stats`, set by tests and evidence runs)."""

    def __init__(self, head_dim: int, theta: float, cfg: DualChunkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = head_dim
        self.theta = theta
        self.stats: DualChunkStats | None = None
        # Same op order as RotaryEmbedding: fp32 inv_freq, fp32 positions * inv_freq, cos/sin.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.arange(cfg.chunk_size + 1, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (chunk_size + 1, D)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def rotate(self, x: torch.Tensor, rot_pos: torch.Tensor) -> torch.Tensor:
        """x (T, H, D) rotated to rotary positions rot_pos (T,)."""
        cos = self.cos_table[rot_pos].unsqueeze(1).to(x.dtype)
        sin = self.sin_table[rot_pos].unsqueeze(1).to(x.dtype)
        return rotate(x, cos, sin)

    def bind(self, positions: torch.Tensor) -> DualChunkPositions:
        return DualChunkPositions(self, positions)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.cfg.to_dict().items())


@dataclass
class DualChunkPositions:
    """What the model hands its attention layers instead of (cos, sin) when DCA is on: the
    step's positions (B, T); q and k stay unrotated until the attention."""

    rope: DualChunkRope
    positions: torch.Tensor
    _checked: bool = field(default=False, repr=False)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_metadata: Any,
        *,
        scale: float,
    ) -> torch.Tensor:
        """q (B, T, Hq, D), k/v (B, T, Hkv, D), unrotated -> (B, T, Hq, D)."""
        if attn_metadata is not None:
            backend = getattr(attn_metadata, "attend_dual_chunk", None)
            if backend is None:
                raise NotImplementedError(
                    f"dual chunk attention: the attention backend {type(attn_metadata).__name__} does not "
                    "support it (use the engine's paged cache or no cache)"
                )
            return backend(layer_idx, q, k, v, self.rope, scale=scale)
        # No cache: every row is a whole sequence starting at position 0.
        b, t = q.shape[:2]
        pos = self.positions.reshape(-1, t)
        if not self._checked:
            if not bool((pos == torch.arange(t, device=pos.device)).all()):
                raise ValueError("dual chunk attention without a KV cache needs positions 0..T-1 in every row")
            self._checked = True
        outs = [dual_chunk_attention(q[i], k[i], v[i], pos[0], self.rope, scale=scale) for i in range(b)]
        return torch.stack(outs)


# ---------------------------------------------------------------------- attention
# CPU flash attention that also returns the log-sum-exp (memory bounded, multithreaded).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax part. q (n, Hq, D) rotated, k/v (m, Hkv, D) rotated, mask (n, m) bool or None
    -> out (n, Hq, D), lse (n, Hq), fp32. Query head h reads KV head h // (Hq / Hkv)."""
    g = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
    kh = k.repeat_interleave(g, dim=1).transpose(0, 1).unsqueeze(0)  # (1, Hq, m, D)
    vh = v.repeat_interleave(g, dim=1).transpose(0, 1).unsqueeze(0)
    if _FLASH_CPU is not None and q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad):
        add = None if mask is None else torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        out, lse = _FLASH_CPU(qh, kh, vh, 0.0, False, attn_mask=add, scale=scale)
    else:
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (1, Hq, n, m)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), vh)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def _merge(
    acc: tuple[torch.Tensor, torch.Tensor] | None, part: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse


def dual_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    rope: DualChunkRope,
    *,
    scale: float,
    block_q: int = 256,
    block_k: int = 4096,
) -> torch.Tensor:
    """DCA of queries at positions `q_pos` over one sequence's keys.

    q (Tq, Hq, D), k/v (Tk, Hkv, D), all unrotated; key j sits at position j and a query at p
    sees keys 0..p (so p < Tk). Returns (Tq, Hq, D) in q's dtype; the math runs in fp32.
    """
    cfg, stats = rope.cfg, rope.stats
    cl = cfg.chunk_len
    tq, hq, d = q.shape
    tk = k.shape[0]
    if tq == 0:
        return q.new_empty(q.shape)
    if int(q_pos.max()) >= tk:
        raise ValueError(f"dual chunk attention: a query at position {int(q_pos.max())} has only {tk} keys")
    if stats is not None:
        stats.calls += 1
    dtype = q.dtype
    qf, vf = q.float(), v.float()
    k_pos = torch.arange(tk, device=q.device)
    kp = key_positions(k_pos, cfg)
    kr = rope.rotate(k.float(), kp)  # (Tk, Hkv, D)
    temp = length_temperature(q_pos, cfg)
    if temp is not None:  # the per-query temperature scales that query's logits
        qf = qf * temp.to(q.device)[:, None, None]
    out = torch.empty(tq, hq, d, dtype=torch.float32, device=q.device)
    chunk_of = (q_pos // cl).tolist()
    start = 0
    while start < tq:
        # rows [start, stop): one query chunk, at most block_q rows (positions ascend)
        c = chunk_of[start]
        stop = start + 1
        while stop < tq and stop - start < block_q and chunk_of[stop] == c:
            stop += 1
        qp = q_pos[start:stop]
        q_intra, q_succ, q_inter = query_positions(qp, cfg)
        rows = qf[start:stop]
        lo, hi = c * cl, min(int(qp[-1]) + 1, tk)
        mask = k_pos[None, lo:hi] <= qp[:, None]  # causal inside the chunk
        if stats is not None:
            stats.update(q_intra, kp[lo:hi], mask)
        acc = _partial(rope.rotate(rows, q_intra), kr[lo:hi], vf[lo:hi], scale, mask)
        if c >= 1:
            lo, hi = (c - 1) * cl, c * cl
            if stats is not None:
                stats.update(q_succ, kp[lo:hi], None)
            acc = _merge(acc, _partial(rope.rotate(rows, q_succ), kr[lo:hi], vf[lo:hi], scale, None))
        if c >= 2:
            qr = rope.rotate(rows, q_inter)
            for lo in range(0, (c - 1) * cl, block_k):
                hi = min(lo + block_k, (c - 1) * cl)
                if stats is not None:
                    stats.update(q_inter, kp[lo:hi], None)
                acc = _merge(acc, _partial(qr, kr[lo:hi], vf[lo:hi], scale, None))
        out[start:stop] = acc[0]
        start = stop
    return out.to(dtype)


# ---------------------------------------------------------------------- model switch
def enable_dual_chunk_attention(model: nn.Module, spec: str | Mapping[str, Any] | DualChunkConfig | None) -> DualChunkConfig | None:
    """Turn DCA on for a Qwen2ForCausalLM in place (its config records it); None: leave as is.

    Returns the config in force (the model's own `dual_chunk_attention_config` when `spec` is
    None)."""
    inner = getattr(model, "model", None)
    cfg = parse_dual_chunk_attention(spec)
    if inner is None or not hasattr(inner, "dual_chunk"):
        if cfg is None:
            return None
        raise TypeError(f"dual chunk attention needs a qwenkit Qwen2ForCausalLM, got {type(model).__name__}")
    if cfg is None:
        return inner.dual_chunk.cfg if inner.dual_chunk is not None else None
    mc = model.config
    if any(mc.layer_sliding_window(i) is not None for i in range(mc.num_hidden_layers)):
        raise ValueError("dual chunk attention does not combine with a sliding-window model config")
    model.config = mc.replace(dual_chunk_attention_config=cfg.to_dict())
    device = next(model.parameters()).device
    inner.dual_chunk = DualChunkRope(mc.head_dim, mc.rope_theta, cfg).to(device)
    logger.info(
        "dual chunk attention: chunk_size=%d local_size=%d (chunks of %d tokens)%s",
        cfg.chunk_size, cfg.local_size, cfg.chunk_len,
        f", length temperature from L0={cfg.original_max_position_embeddings}" if cfg.original_max_position_embeddings else "",
    )  # fmt: skip
    return cfg


__all__ = [
    "DualChunkConfig",
    "DualChunkPositions",
    "DualChunkRope",
    "DualChunkStats",
    "dual_chunk_attention",
    "enable_dual_chunk_attention",
    "key_positions",
    "length_temperature",
    "parse_dual_chunk_attention",
    "query_positions",
]


def add_dual_chunk_arg(g: Any) -> None:
    """`--dual-chunk-attention chunk_size=N,local_size=M` (generate, chat, serve, eval)."""
    g.add_argument("--dual-chunk-attention", default=None, metavar="chunk_size=N,local_size=M",
                   help="Dual Chunk Attention for contexts past the trained window (qwenkit.model.dca); "
                        "optional original_max_position_embeddings=L0 adds the length temperature")
