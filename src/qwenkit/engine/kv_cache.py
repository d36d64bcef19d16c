"""The paged KV pools: one K and one V tensor per layer, sized from a memory budget.

`kv_cache_dtype="int8"` (vLLM's option name) stores K and V as int8 with one fp32 scale per
token and KV head (symmetric: scale = absmax / 127 over head_dim, written with the token), so a
token-head costs 2 * (D + 4) bytes instead of 2 * D * 4 (fp32): ~3.8x the tokens in the same
memory (~1.9x vs bf16). Readers dequantize (torch: per gathered block; the C kernels fold the
scales into the dot products and the softmax weights).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from qwenkit.config import ModelConfig

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip

# Without an explicit budget: this share of the available RAM (CPU) or free GPU memory.
DEFAULT_CPU_SHARE = 0.2
DEFAULT_GPU_SHARE = 0.8


def parse_memory(value: int | float | str) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"``, ``"1.5g"``, ``"1e9"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise ValueError(f"kv_cache_memory: cannot parse {value!r} (examples: 4GiB, 512MB, 1e9)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"kv_cache_memory must be positive, got {value!r}")
    return n


KV_CACHE_DTYPES = ("auto", "int8")
_FP8 = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")  # vLLM's values, refused with a hint


def check_kv_cache_dtype(value: str) -> str:
    """`value` if this build stores it ("auto": the model's dtype, "int8"), else a clear error."""
    if value in KV_CACHE_DTYPES:
        return value
    if value in _FP8:
        raise ValueError(f"kv_cache_dtype={value!r} is not supported on this build (CPU, no fp8 kernels); use int8")
    raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {value!r}")


def add_kv_cache_dtype_arg(g: Any, default: str | None = "auto", extra_help: str = "") -> None:
    """`--kv-cache-dtype` (generate, chat, serve, eval, bench)."""
    import argparse

    def parse(value: str) -> str:
        try:
            return check_kv_cache_dtype(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    g.add_argument("--kv-cache-dtype", default=default, type=parse, metavar="{auto,int8}",
                   help="KV cache storage: auto (the model's dtype) or int8 (per token-and-head scales: "
                        "~3.8x the tokens of fp32 in the same --kv-cache-memory)" + extra_help)  # fmt: skip


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> int8 codes (..., D) and fp32 scales (...): symmetric absmax / 127 per row,
    round half to even, so |x - codes * scale| <= absmax / 254. An all-zero row gets scale 1.
    The fused C decode step (csrc/decode_step.c) rounds exactly the same way."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: GPU free memory, or MemAvailable of the host."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_cache_memory(device: torch.device) -> int:
    share = DEFAULT_GPU_SHARE if device.type == "cuda" else DEFAULT_CPU_SHARE
    return int(available_memory(device) * share)


class KVCache:
    """`k_cache[layer]`, `v_cache[layer]`: (num_blocks, block_size, num_kv_heads, head_dim).

    Slot `s` of a layer is token position `s % block_size` of block `s // block_size`; the
    attention code views each pool as (num_blocks * block_size, num_kv_heads, head_dim).
    Pools start zeroed so that padded (masked) reads never see NaN/Inf.

    `kv_cache_dtype="int8"`: the pools hold int8 codes and `k_scale[layer]` / `v_scale[layer]`
    (num_blocks, block_size, num_kv_heads) fp32 their scales; `dtype` stays the dtype attention
    computes in (what `write` takes and `gather` returns).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.quantized = kv_cache_dtype == "int8"
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self._storage = torch.zeros(shape, dtype=torch.int8 if self.quantized else dtype, device=device)
        self._scales = torch.ones(shape[:-1] if self.quantized else (0,), dtype=torch.float32, device=device)
        self.k_scale = [self._scales[i, 0] for i in range(num_layers)] if self.quantized else None
        self.v_scale = [self._scales[i, 1] for i in range(num_layers)] if self.quantized else None
        self.k_cache = [self._storage[i, 0] for i in range(num_layers)]
        self.v_cache = [self._storage[i, 1] for i in range(num_layers)]
        # Flat slot views used by writes and gathers: (num_blocks * block_size, Hkv, D).
        self.k_slots = [t.view(-1, num_kv_heads, head_dim) for t in self.k_cache]
        self.v_slots = [t.view(-1, num_kv_heads, head_dim) for t in self.v_cache]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size() + self._scales.numel() * 4

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the K/V rows (N, Hkv, D) of a step's tokens at `slots` (N,) of `layer`."""
        if not self.quantized:
            self.k_slots[layer].index_copy_(0, slots, k.to(self.dtype))
            self.v_slots[layer].index_copy_(0, slots, v.to(self.dtype))
            return
        for x, pool, scales in ((k, self.k_slots, self.k_scale), (v, self.v_slots, self.v_scale)):
            codes, scale = quantize_kv(x)
            pool[layer].index_copy_(0, slots, codes)
            scales[layer].view(-1, scales[layer].shape[-1]).index_copy_(0, slots, scale)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given physical blocks, (len(blocks), block_size, Hkv, D) in `dtype`
        (dequantized from int8 when the cache is quantized)."""
        k = self.k_cache[layer].index_select(0, blocks)
        v = self.v_cache[layer].index_select(0, blocks)
        if not self.quantized:
            return k, v
        ks = self.k_scale[layer].index_select(0, blocks)
        vs = self.v_scale[layer].index_select(0, blocks)
        return dequantize_kv(k, ks, self.dtype), dequantize_kv(v, vs, self.dtype)

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None,
        num_layers: int | None = None, kv_cache_dtype: str = "auto",
    ) -> int:
        """Bytes of one block over all layers: 2 (K, V) x heads x (D x itemsize, + a 4-byte
        scale per token-head for int8)."""
        layers = num_layers or config.num_hidden_layers
        heads = 2 * layers * (num_kv_heads or config.num_key_value_heads)
        if check_kv_cache_dtype(kv_cache_dtype) == "int8":
            per_head = config.head_dim + 4
        else:
            per_head = config.head_dim * torch.empty((), dtype=dtype).element_size()
        return heads * per_head * block_size

    @classmethod
    def from_memory_budget(
        cls,
        config: ModelConfig,
        block_size: int,
        memory: int | str | None,
        dtype: torch.dtype,
        device: torch.device,
        max_useful_tokens: int | None = None,
        num_kv_heads: int | None = None,
        num_layers: int | None = None,
        kv_cache_dtype: str = "auto",
    ) -> KVCache:
        """As many blocks as fit in `memory` bytes (None: a share of what is free), never more
        than `max_useful_tokens` need. `num_kv_heads`: the heads this process stores (a
        tensor-parallel rank's share; default all of them); `num_layers` likewise (a pipeline stage's)."""
        budget = parse_memory(memory) if memory is not None else default_kv_cache_memory(device)
        per_block = cls.bytes_per_block(config, block_size, dtype, num_kv_heads, num_layers, kv_cache_dtype)
        num_blocks = budget // per_block
        if max_useful_tokens is not None and memory is None:
            num_blocks = min(num_blocks, -(-max_useful_tokens // block_size))
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={memory!r} ({budget} bytes) holds no block of {block_size} tokens "
                f"({per_block} bytes each)"
            )
        logger.info(
            "KV cache (%s): %d blocks x %d tokens (%.1f MiB, %d tokens)",
            kv_cache_dtype if kv_cache_dtype != "auto" else str(dtype).removeprefix("torch."),
            num_blocks, block_size, num_blocks * per_block / 2**20, num_blocks * block_size,
        )
        return cls(
            num_layers or config.num_hidden_layers, int(num_blocks), block_size,
            num_kv_heads or config.num_key_value_heads, config.head_dim, dtype, device, kv_cache_dtype,
        )  # fmt: skip
