"""Building blocks of the Qwen2 decoder: RMSNorm, rotary embedding, fused linears, SwiGLU.

Fused projections use vLLM's names (`qkv_proj`, `gate_up_proj`); each fused parameter knows how
to load its HF shards (`weight_loader(param, tensor, shard_id)`) and how to split itself back
(`split_for_export`), so one generic loader and exporter serve the whole model.

Everything here is plain torch. Runtimes swap in faster subclasses after construction (the CPU
kernels: `qwenkit.cpu.install`); the small methods they override (`SwiGLU.act_and_mul`,
`Qwen2Attention.rotate_qk`) exist so that the forward passes are written once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Numerics (HF): normalise in fp32, cast back to the input dtype *before* the weight.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RopeScalingError(ValueError):
    """A `rope_scaling` dict names an unknown type or holds an impossible value."""


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "ntk")


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
    """The scaling kind of an HF `rope_scaling` / `rope_parameters` dict ("default" if none)."""
    rs = rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type")) or "default"
    return "default" if kind == "none" else str(kind)


def _factor(rs: Mapping[str, Any], key: str = "factor") -> float:
    value = rs.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 1:
        raise RopeScalingError(f"rope_scaling.{key} must be a number >= 1, got {value!r}")
    return float(value)


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # HF's op order: fp32 exponents, python-float base
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    head_dim: int, theta: float, rs: Mapping[str, Any], max_position: int, factor: float | None = None
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) as transformers computes it: per-pair blend of interpolated
    (1 / (factor * base^(2i/d))) and original frequencies over a linear ramp between the pair
    indices that turn beta_fast and beta_slow times in `original_max_position_embeddings`
    (floor/ceil of the bounds unless `truncate` is false); cos/sin scaled by the attention factor."""
    factor = _factor(rs) if factor is None else factor
    orig = int(rs.get("original_max_position_embeddings") or max_position)
    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    d = head_dim

    def pair_index(rotations: float) -> float:
        # the pair whose wavelength fits `rotations` times into the original context
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (fast pairs), 0: interpolate
    pos_freqs = theta ** (torch.arange(0, d, 2, dtype=torch.float, device="cpu") / d)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def dynamic_ntk_inv_freq(
    head_dim: int, theta: float, factor: float, max_position: int, seq_len: int
) -> torch.Tensor:
    """transformers' "dynamic" NTK: for seq_len > max_position the base grows to
    base * (factor * seq_len / max_position - (factor - 1)) ^ (d / (d - 2)); computed in fp32
    tensors, as transformers does with its tensor seq_len."""
    d = head_dim
    n = torch.tensor(max(seq_len, max_position), dtype=torch.int64, device="cpu")
    base = theta * ((factor * n / max_position) - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))


def scaled_max_positions(rope_scaling: Mapping[str, Any] | None, max_position: int) -> int:
    """The context a scaling covers: factor * original_max for yarn / linear / ntk-by-factor."""
    kind = rope_type(rope_scaling)
    rs = rope_scaling or {}
    if kind in ("yarn", "linear", "dynamic"):
        factors = rs.get("factors") or [rs.get("factor") or 1]
        orig = int(rs.get("original_max_position_embeddings") or max_position)
        return max(max_position, int(max(float(f) for f in factors) * orig))
    return max_position


class RotaryEmbedding(nn.Module):
    """Half-split ("rotate_half") RoPE; cos/sin tables computed in fp32, grown on demand.

    One instance serves every layer: `forward(positions)` gathers (cos, sin) once per step.
    `rope_scaling` (HF's dict) selects the frequencies:

    * ``linear``: inv_freq / factor;
    * ``dynamic`` (transformers' dynamic NTK): the base grows with the call's length
      (max position + 1) once it passes `max_position`; shorter calls use plain RoPE;
    * ``yarn``: see `yarn_inv_freq`; with ``"factors": [1, 2, 4]`` (or ``"dynamic": true``:
      the powers of two up to ``factor``) one table per factor is kept and each call picks a
      factor per token (`factor_index`) — the engine's per-request YaRN; factor 1 is plain RoPE;
    * ``ntk`` (NTK-aware, fixed): base * alpha ^ (d / (d - 2)) with ``alpha``.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        rope_scaling: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kind = rope_type(rope_scaling)
        if kind not in ROPE_TYPES:
            raise RopeScalingError(
                f"rope_scaling.rope_type {kind!r} is not supported (expected one of {ROPE_TYPES})"
            )
        rs = dict(rope_scaling or {})
        self.kind = kind
        self.head_dim = head_dim
        self.theta = theta
        self.max_position = max_position
        self.rope_scaling = rs
        self.factors: tuple[float, ...] = ()  # per-request YaRN factors (empty: one table)
        self.original_max_position = int(rs.get("original_max_position_embeddings") or max_position)
        # validated now; the frequencies are (re)computed from `theta` when a table is built
        if kind in ("linear", "dynamic") or (kind == "yarn" and not (rs.get("factors") or rs.get("dynamic"))):
            _factor(rs)
        elif kind == "ntk":
            _factor(rs, "alpha")
        elif kind == "yarn":
            if rs.get("factors"):
                factors = sorted({_factor({"factor": f}) for f in rs["factors"]})
            else:
                top = _factor(rs)
                factors = sorted({2.0**i for i in range(int(math.log2(top)) + 1)} | {top})
            self.factors = tuple(factors)
        self._cache_len = 0
        self.cos_cached: torch.Tensor | None = None  # (num_tables, L, D)
        self.sin_cached: torch.Tensor | None = None

    def table_freqs(self) -> list[tuple[torch.Tensor, float]]:
        """(inv_freq, attention factor) of each table: one, or one per per-request YaRN factor
        (factor 1 is exactly plain RoPE)."""
        d, theta, rs = self.head_dim, self.theta, self.rope_scaling
        if self.factors:
            return [
                (_default_inv_freq(d, theta), 1.0) if f == 1.0
                else yarn_inv_freq(d, theta, rs, self.max_position, factor=f)
                for f in self.factors
            ]  # fmt: skip
        if self.kind == "linear":
            return [(_default_inv_freq(d, theta) / _factor(rs), 1.0)]
        if self.kind == "ntk":
            return [(_default_inv_freq(d, theta * _factor(rs, "alpha") ** (d / (d - 2))), 1.0)]
        if self.kind == "yarn":
            return [yarn_inv_freq(d, theta, rs, self.max_position)]
        return [(_default_inv_freq(d, theta), 1.0)]  # default; dynamic within max_position

    @property
    def inv_freq(self) -> torch.Tensor:
        """The frequencies of the (first) table."""
        return self.table_freqs()[0][0]

    @property
    def attention_scaling(self) -> float:
        return self.table_freqs()[0][1]

    def factor_index(self, length: int) -> int:
        """Per-request YaRN: the smallest factor f with f * original_max >= length (the largest
        if none covers it)."""
        for i, f in enumerate(self.factors):
            if f * self.original_max_position >= length:
                return i
        return len(self.factors) - 1

    @staticmethod
    def _cos_sin(freqs: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat((freqs, freqs), dim=-1)
        if scale == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * scale, emb.sin() * scale

    def _build(self, length: int, device: torch.device) -> None:
        # Same op order as HF: fp32 inv_freq, fp32 positions * inv_freq, cos/sin in fp32.
        pos = torch.arange(length, dtype=torch.float, device="cpu")
        tables = [self._cos_sin(pos[:, None] * f[None, :], s) for f, s in self.table_freqs()]
        self.cos_cached = torch.stack([c for c, _ in tables]).to(device)
        self.sin_cached = torch.stack([s for _, s in tables]).to(device)
        self._cache_len = length

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, factor_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., T) -> cos, sin of shape (..., T, 1, D) in `dtype`.

        `factor_index` (same shape as positions): the per-request YaRN table of each token;
        None picks one from the call's length."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self.kind == "dynamic" and need > self.max_position:
            inv_freq = dynamic_ntk_inv_freq(self.head_dim, self.theta, _factor(self.rope_scaling), self.max_position, need)
            cos, sin = self._cos_sin(positions[..., None].float() * inv_freq.to(positions.device), 1.0)
            return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)
        if self.cos_cached is None or need > self._cache_len or self.cos_cached.device != positions.device:
            self._build(max(need, min(2 * self._cache_len, self.max_position), 256), positions.device)
        if factor_index is None:
            table = self.factor_index(need) if self.factors else 0
            cos, sin = self.cos_cached[table][positions], self.sin_cached[table][positions]
        else:
            cos, sin = self.cos_cached[factor_index, positions], self.sin_cached[factor_index, positions]
        return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (..., T, Hq, D), k: (..., T, Hkv, D), cos/sin: (..., T, 1, D)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., T, H, D), cos/sin: (..., T, 1, D) -> x rotated (rotate_half form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MergedLinear(nn.Linear):
    """A linear layer whose output rows are the concatenation of several HF projections.

    `shard_names` name the HF projections in order (e.g. ``("q_proj", "k_proj", "v_proj")``)
    and `output_sizes` their row counts.
    """

    def __init__(
        self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str], bias: bool
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        assert len(output_sizes) == len(shard_names)
        self.output_sizes = tuple(output_sizes)
        self.shard_names = tuple(shard_names)

    def shard_slice(self, shard_name: str) -> slice:
        idx = self.shard_names.index(shard_name)
        start = sum(self.output_sizes[:idx])
        return slice(start, start + self.output_sizes[idx])

    def load_shard(self, param_name: str, shard_name: str, tensor: torch.Tensor) -> None:
        param = getattr(self, param_name)
        rows = self.shard_slice(shard_name)
        target = param.data[rows]
        if target.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {shard_name}.{param_name}: expected {tuple(target.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        target.copy_(tensor)

    def split_for_export(self, param_name: str) -> dict[str, torch.Tensor]:
        param = getattr(self, param_name)
        return {name: param.data[self.shard_slice(name)] for name in self.shard_names}


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = MergedLinear(
            hidden_size, [intermediate_size] * 2, ("gate_proj", "up_proj"), bias=False
        )
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))

    def act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(..., 2I) -> silu(gate) * up, (..., I)."""
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
