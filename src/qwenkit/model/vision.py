"""The Qwen2.5-VL vision encoder (a ViT with window attention) as a plain nn.Module.

pixel_values (N patches, C * temporal_patch * patch * patch), one row per 14x14 patch as the
image processor flattens them (2x2 merge groups contiguous) -> (N / merge^2, out_hidden_size),
the language-model embeddings of the image tokens.

Per image: Conv3d patch embedding (as one GEMM: stride = kernel), 2-D rotary positions (h, w),
blocks of RMSNorm + attention + RMSNorm + SwiGLU (biased), where the blocks listed in
`fullatt_block_indexes` attend over the whole image and the others within windows of
`window_size` pixels; tokens are permuted into window order (in merge groups) first and the
merger's output is permuted back. Attention never crosses images (`cu_seqlens`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import ConfigError
from qwenkit.model.layers import RMSNorm, rotate

_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class VisionConfig:
    """HF ``vision_config`` of Qwen2.5-VL (transformers' Qwen2_5_VLVisionConfig names and defaults)."""

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> VisionConfig:
        d = cls()
        rope = cfg.get("rope_parameters") or {}
        try:
            out = cls(
                depth=int(cfg.get("depth", d.depth)),
                hidden_size=int(cfg.get("hidden_size", d.hidden_size)),
                hidden_act=str(cfg.get("hidden_act", d.hidden_act)),
                intermediate_size=int(cfg.get("intermediate_size", d.intermediate_size)),
                num_heads=int(cfg.get("num_heads", d.num_heads)),
                in_channels=int(cfg.get("in_channels", cfg.get("in_chans", d.in_channels))),
                patch_size=int(cfg.get("patch_size", d.patch_size)),
                spatial_merge_size=int(cfg.get("spatial_merge_size", d.spatial_merge_size)),
                temporal_patch_size=int(cfg.get("temporal_patch_size", d.temporal_patch_size)),
                tokens_per_second=int(cfg.get("tokens_per_second", d.tokens_per_second)),
                window_size=int(cfg.get("window_size", d.window_size)),
                out_hidden_size=int(cfg.get("out_hidden_size", d.out_hidden_size)),
                fullatt_block_indexes=tuple(int(i) for i in cfg.get("fullatt_block_indexes", d.fullatt_block_indexes)),
                rope_theta=float(rope.get("rope_theta", d.rope_theta)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"vision_config: {e}") from None
        if out.hidden_act not in _ACTS:
            raise ConfigError(f"vision_config.hidden_act {out.hidden_act!r} is not supported (expected one of {sorted(_ACTS)})")
        if out.hidden_size % out.num_heads or (out.hidden_size // out.num_heads) % 4:
            raise ConfigError(
                f"vision_config: hidden_size={out.hidden_size} / num_heads={out.num_heads} must be a multiple of 4"
            )
        if out.window_size < out.patch_size * out.spatial_merge_size:
            raise ConfigError(
                f"vision_config.window_size={out.window_size} is smaller than one merged patch "
                f"({out.patch_size * out.spatial_merge_size} pixels)"
            )
        return out

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def vision_positions(grid_thw: Sequence[Sequence[int]], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates of every patch row, in the processor's merge-group order: (N, 2)."""
    out = []
    for t, h, w in grid_thw:
        hpos = torch.arange(h)[:, None].expand(h, w)
        wpos = torch.arange(w)[None, :].expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        hw = torch.stack([p.reshape(shape).transpose(1, 2).flatten() for p in (hpos, wpos)], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_index(
    grid_thw: Sequence[Sequence[int]], merge: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, list[int]]:
    """The merge-group permutation into window order, and the cumulative patch counts of the
    windows (empty windows dropped), as transformers' `get_vision_window_index`."""
    win = window_size // merge // patch_size  # merged patches per window side
    unit = merge * merge
    index, cu, base = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = win - gh % win, win - gw % win  # transformers pads a full window when divisible
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = F.pad(ids, (0, pw, 0, ph), value=-1)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        counts = (padded >= 0).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat >= 0] + base)
        for c in counts.tolist():
            if c:
                cu.append(cu[-1] + c * unit)
        base += t * gh * gw
    return torch.cat(index), cu


def segment_bounds(grid_thw: Sequence[Sequence[int]]) -> list[int]:
    """Cumulative patch counts of the full-attention segments (one per frame of each image)."""
    cu = [0]
    for t, h, w in grid_thw:
        for _ in range(t):
            cu.append(cu[-1] + h * w)
    return cu


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # (N, H, D) each
        cos, sin = rope  # (N, 1, D) fp32
        q = rotate(q.float(), cos, sin).to(x.dtype)
        k = rotate(k.float(), cos, sin).to(x.dtype)
        out = torch.empty_like(q)
        for lo, hi in zip(cu[:-1], cu[1:]):  # bidirectional attention within each segment
            # 4-D (1, H, n, D): the CPU flash kernel (3-D inputs fall back to the math path)
            qs, ks, vs = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))
            out[lo:hi] = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim**-0.5)[0].transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_ACTS[self.act](self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cu)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # stride == kernel: the convolution of each patch row is one dot product per channel
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of patch features (concatenated) through Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.group = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.group, self.group), nn.GELU(), nn.Linear(self.group, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.group))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """Frequencies of one spatial axis: head_dim / 4 of them (h and w share them)."""
        half = self.config.hidden_size // self.config.num_heads // 2
        return 1.0 / (self.config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=device) / half))

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> None:
        cfg = self.config
        n = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.dim() != 2 or pixel_values.shape != (n, cfg.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; image_grid_thw {list(map(list, grid_thw))} "
                f"needs ({n}, {cfg.patch_dim})"
            )
        m = cfg.spatial_merge_size
        for t, h, w in grid_thw:
            if h % m or w % m or min(t, h, w) < 1:
                raise ValueError(f"image_grid_thw {[t, h, w]}: h and w must be positive multiples of {m}")

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, patch_dim) -> (N / merge^2, out_hidden_size), images concatenated in order."""
        cfg = self.config
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        self.check_inputs(pixel_values, grid_thw)
        unit = cfg.spatial_merge_size**2
        order, cu_window = window_index(grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        cu_full = segment_bounds(grid_thw)
        # token order: merge groups in window order, the 4 patches of a group kept together
        perm = (order[:, None] * unit + torch.arange(unit)).reshape(-1).to(pixel_values.device)

        x = self.patch_embed(pixel_values)[perm]  # (N, D)
        pos = vision_positions(grid_thw, cfg.spatial_merge_size).to(pixel_values.device)[perm]
        freqs = (pos[..., None].float() * self.inv_freq(pos.device)).flatten(1)  # (N, D/2): h freqs, w freqs
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, D)
        rope = (emb.cos(), emb.sin())
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cu_full if i in full else cu_window)
        merged = self.merger(x)  # (N / unit, out)
        return merged[torch.argsort(order.to(merged.device))]
