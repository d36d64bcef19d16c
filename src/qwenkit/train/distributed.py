"""Data parallelism through torch.distributed: DDP (gloo on CPU, NCCL on CUDA) or FSDP2
(`fully_shard` on a 1-D device mesh). Launched by torchrun, whose rendezvous also spans nodes
(`--nnodes`, `--rdzv-endpoint`); a plain `python -m qwenkit train` is one rank."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by it (RANK / WORLD_SIZE in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined (%s)", rank, world, backend)
    return DistInfo(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over ranks (fp64 on the CPU for gloo; the device for NCCL)."""
    if not info.enabled:
        return list(values)
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(module: nn.Module, info: DistInfo, fsdp: bool, layers: list[nn.Module]) -> nn.Module:
    """DDP or FSDP2 around the training module. FSDP2 shards each decoder layer, then the root
    (embedding, final norm, LM head)."""
    if not info.enabled and not fsdp:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # frozen base weights (LoRA) have no gradient: nothing to find, static graph
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)
