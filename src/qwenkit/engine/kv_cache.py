"""The paged KV pools: one K and one V tensor per layer, sized from a memory budget."""
from __future__ import annotations

import logging
import os
import re

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
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self._storage = torch.zeros(shape, dtype=dtype, device=device)
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
        return self._storage.numel() * self._storage.element_size()

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None,
        num_layers: int | None = None,
    ) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        layers = num_layers or config.num_hidden_layers
        per_token = 2 * layers * (num_kv_heads or config.num_key_value_heads) * config.head_dim
        return per_token * block_size * itemsize

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
    ) -> KVCache:
        """As many blocks as fit in `memory` bytes (None: a share of what is free), never more
        than `max_useful_tokens` need. `num_kv_heads`: the heads this process stores (a
        tensor-parallel rank's share; default all of them); `num_layers` likewise (a pipeline stage's)."""
        budget = parse_memory(memory) if memory is not None else default_kv_cache_memory(device)
        per_block = cls.bytes_per_block(config, block_size, dtype, num_kv_heads, num_layers)
        num_blocks = budget // per_block
        if max_useful_tokens is not None and memory is None:
            num_blocks = min(num_blocks, -(-max_useful_tokens // block_size))
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={memory!r} ({budget} bytes) holds no block of {block_size} tokens "
                f"({per_block} bytes each)"
            )
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB, %d tokens)",
            num_blocks, block_size, num_blocks * per_block / 2**20, num_blocks * block_size,
        )
        return cls(
            num_layers or config.num_hidden_layers, int(num_blocks), block_size,
            num_kv_heads or config.num_key_value_heads, config.head_dim, dtype, device,
        )  # fmt: skip
