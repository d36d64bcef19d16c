"""Tensor- and pipeline-parallel execution: rank 0 schedules, every rank runs its shard
(nano-vllm layout).

Rank 0 (the process that holds the `LLMEngine`) prepares each step as usual, broadcasts the
step's model inputs (token ids, positions, KV slots, block tables, which rows need logits) on a
control group, and then runs the forward like every other rank; only rank 0 samples. Workers
hold their own KV cache (their KV heads or their layers, the same block layout) and follow the
broadcasts. Tensor parallel: `qwenkit.parallel.tp`; pipeline stages: `qwenkit.parallel.pp`, where
every rank cuts the step the same way into micro-batches of whole sequences (`split_plan`) so the
stages overlap.

Workers are started here with torch.multiprocessing (spawn; gloo on CPU, NCCL on CUDA) or, when
the process was launched by torchrun (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set), every
rank but 0 becomes a worker inside `ModelParallel.start`. A worker that dies makes the next
step on rank 0 raise `WorkerLostError` (its exit code checked before each step; collectives
carry a timeout as a backstop), so in-flight requests get an error instead of a hang.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qwenkit import cpu
from qwenkit.engine.kv_cache import KVCache
from qwenkit.engine.model_runner import PROMPT_LOGPROBS_ROWS, ModelRunner, StepInputs
from qwenkit.engine.paged_attention import PagedAttentionMetadata, SequenceGroup
from qwenkit.engine.scheduler import SchedulerOutput
from qwenkit.errors import QwenkitError
from qwenkit.parallel import (
    MicroBatch,
    apply_pipeline_parallel,
    apply_tensor_parallel,
    check_tensor_parallel,
    local_kv_heads,
    run_first_stage,
    run_stage,
    stage_layers,
)

logger = logging.getLogger(__name__)

# One collective's limit (a step's all-reduce), seconds; a dead peer usually fails at once.
TIMEOUT_ENV = "QWENKIT_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
_IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait this long for the next step


class WorkerLostError(QwenkitError, RuntimeError):
    """A tensor-parallel worker died or stopped answering; the engine cannot step any more."""


@dataclass
class StepPlan:
    """What a worker needs to run rank 0's step: the forward inputs and which rows get logits."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]  # token_start, query/context lens, tables
    sample_index: torch.Tensor
    prompt_rows: list[tuple[int, int]]
    rope_factor_index: torch.Tensor | None = None  # per-request RoPE factors (engine's dynamic YaRN)

    @classmethod
    def from_inputs(cls, inputs: StepInputs) -> StepPlan:
        md = inputs.attn_metadata
        cpu_ = torch.device("cpu")
        return cls(
            inputs.input_ids.to(cpu_), inputs.positions.to(cpu_), md.slot_mapping.to(cpu_),
            [(g.token_start, g.query_lens, g.context_lens, g.block_tables) for g in md.groups],
            inputs.sample_index.to(cpu_), [(c.lo, c.hi) for c in inputs.prompt_chunks],
            None if inputs.rope_factor_index is None else inputs.rope_factor_index.to(cpu_),
        )  # fmt: skip


def split_plan(plan: StepPlan, micro_batches: int) -> list[StepPlan]:
    """The step cut into at most `micro_batches` runs of whole consecutive sequences, each with
    about the same number of tokens (at least one sequence each); `sample_index` and
    `prompt_rows` are left empty (logits are taken from the concatenated hidden states)."""
    seqs = []  # (group, index in group, query len) per sequence, in flat order
    for gi, (_, ql, _, _) in enumerate(plan.groups):
        seqs += [(gi, j, int(n)) for j, n in enumerate(ql.tolist())]
    m = max(1, min(micro_batches, len(seqs)))
    cum = [0]
    for _, _, n in seqs:
        cum.append(cum[-1] + n)
    total, cuts = cum[-1], [0]
    for k in range(1, m):  # the first sequence end at or past k/m of the tokens
        i = next(i for i in range(1, len(seqs) + 1) if cum[i] * m >= k * total)
        cuts.append(min(max(i, cuts[-1] + 1), len(seqs) - (m - k)))
    cuts.append(len(seqs))
    parts = []
    empty = torch.zeros(0, dtype=torch.long)
    for a, b in zip(cuts, cuts[1:]):
        ta, tb = cum[a], cum[b]
        groups = []
        for gi, (_, ql, cl, bt) in enumerate(plan.groups):
            idx = [j for g, j, _ in seqs[a:b] if g == gi]
            if idx:
                lo, hi = idx[0], idx[-1] + 1
                start = sum(n for g, j, n in seqs[a:b] if g < gi)
                groups.append((start, ql[lo:hi], cl[lo:hi], bt[lo:hi]))
        rfi = None if plan.rope_factor_index is None else plan.rope_factor_index[ta:tb]
        parts.append(StepPlan(plan.input_ids[ta:tb], plan.positions[ta:tb], plan.slot_mapping[ta:tb], groups,
                              empty, [], rfi))  # fmt: skip
    return parts


def _micro_batches(
    kv_cache: KVCache, plan: StepPlan, micro_batches: int, streaming_window: int | None, num_sink_tokens: int
) -> list[MicroBatch]:
    """`split_plan`'s parts with their attention metadata over this rank's KV cache."""
    dev = kv_cache.k_cache[0].device
    out = []
    for part in split_plan(plan, micro_batches):
        md = _metadata(kv_cache, part, streaming_window, num_sink_tokens)
        rfi = None if part.rope_factor_index is None else part.rope_factor_index.to(dev)
        out.append(MicroBatch(part.input_ids.to(dev), part.positions.to(dev), md, rfi))
    return out


def _metadata(
    kv_cache: KVCache, plan: StepPlan, streaming_window: int | None, num_sink_tokens: int
) -> PagedAttentionMetadata:
    dev, dtype = kv_cache.k_cache[0].device, kv_cache.dtype
    groups = [
        SequenceGroup(start, ql, cl, bt, kv_cache.block_size, num_sink_tokens, dev, dtype)
        for start, ql, cl, bt in plan.groups
    ]
    return PagedAttentionMetadata(kv_cache, plan.slot_mapping.to(dev), groups, streaming_window=streaming_window)


def tp_quantization(quantization: str | None, num_ranks: int) -> str:
    """The load-time weight format with `num_ranks` ranks: every format splits (quantized
    linears on their codes), so it is the one asked for (``auto`` when none is)."""
    if num_ranks > 1 and quantization in (None, "auto"):
        logger.info("%d ranks: quantization 'auto' (int8 linears are split on their rows / columns)", num_ranks)
    return quantization or "auto"


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


_STARTUP_TIMEOUT = datetime.timedelta(minutes=10)  # rendezvous: ranks import torch / load weights


class _Comm:
    """Two groups made on every rank in the same order: `compute` for the forward's collectives
    and `ctrl` for step plans. Both sides of a plan broadcast wait differently: rank 0 at most
    the step timeout (a hung worker fails the step), workers without a practical limit (an idle
    server's workers wait for the next request)."""

    def __init__(self, device: torch.device, timeout_s: float) -> None:
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.compute = dist.new_group(backend=_backend(device), timeout=self.timeout)
        self.ctrl = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj)
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, self.timeout
        self.ctrl.broadcast([torch.tensor([len(data)], dtype=torch.long)], opts).wait()
        self.ctrl.broadcast([torch.frombuffer(bytearray(data), dtype=torch.uint8)], opts).wait()

    def receive(self) -> Any:
        size = torch.zeros(1, dtype=torch.long)
        dist.broadcast(size, src=0, group=self.ctrl)
        buf = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.ctrl)
        return pickle.loads(buf.numpy().tobytes())


def _shard(model: nn.Module, rank: int, world_size: int, pipeline: bool, comm: _Comm) -> None:
    if pipeline:
        apply_pipeline_parallel(model, rank, world_size, comm.compute)
    else:
        apply_tensor_parallel(model, rank, world_size, comm.compute)


def _execute(
    model: nn.Module, kv_cache: KVCache, plan: StepPlan, streaming_window: int | None, num_sink_tokens: int,
    stage: tuple[int, int, _Comm, int] | None = None,
) -> None:
    """A worker's share of one step: the same forward and the same logits collectives as rank 0
    (tensor parallel), or its layers on each micro-batch between a recv and a send (`stage`:
    rank, world, comm, micro-batches)."""
    dev = kv_cache.k_cache[0].device
    if stage is not None:
        rank, world, comm, micro_batches = stage
        micro = _micro_batches(kv_cache, plan, micro_batches, streaming_window, num_sink_tokens)
        run_stage(model, micro, rank, world, comm.compute)
        return
    md = _metadata(kv_cache, plan, streaming_window, num_sink_tokens)
    extra = {} if plan.rope_factor_index is None else {"rope_factor_index": plan.rope_factor_index.to(dev)}
    hidden = model.hidden_states(plan.input_ids.to(dev), plan.positions.to(dev), md, **extra)
    for lo, hi in plan.prompt_rows:  # ModelRunner._prompt_logprobs's slices
        for a in range(lo, hi, PROMPT_LOGPROBS_ROWS):
            model.compute_logits(hidden[a : min(a + PROMPT_LOGPROBS_ROWS, hi)])
    if plan.sample_index.numel():
        model.compute_logits(hidden[plan.sample_index.to(dev)])


def _worker_loop(model: nn.Module, comm: _Comm, rank: int, world_size: int, pipeline: bool) -> None:
    setup = comm.receive()  # the KV cache layout rank 0 chose
    mc = model.config
    stage = (rank, world_size, comm, setup["micro_batches"]) if pipeline else None
    kv = KVCache(
        len(model.model.layers), setup["num_blocks"], setup["block_size"],
        local_kv_heads(mc, world_size) if not pipeline else mc.num_key_value_heads,
        mc.head_dim, setup["dtype"], comm.device, setup["kv_cache_dtype"],
    )  # fmt: skip
    logger.info("tensor parallel worker %d ready (%d KV blocks)", rank, setup["num_blocks"])
    with torch.inference_mode():
        while True:
            plan = comm.receive()
            if plan is None:
                return
            _execute(model, kv, plan, setup["streaming_window"], setup["num_sink_tokens"], stage)


def _spawned_worker(
    rank: int, world_size: int, pipeline: bool, init_method: str, model: nn.Module, threads: int, timeout_s: float
) -> None:
    """Entry of a worker process started by `ModelParallel.start`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    torch.set_num_threads(threads)
    device = next(model.parameters()).device
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        model.to(device)
    dist.init_process_group(
        _backend(device), init_method=init_method, rank=rank, world_size=world_size,
        timeout=_STARTUP_TIMEOUT,
    )  # fmt: skip
    try:
        comm = _Comm(device, timeout_s)
        _shard(model, rank, world_size, pipeline, comm)
        _worker_loop(model, comm, rank, world_size, pipeline)
    finally:
        dist.destroy_process_group()


class ModelParallel:
    """Rank 0's handle on the group: the workers, the control channel, liveness checks."""

    def __init__(
        self, world_size: int, comm: _Comm, procs: list[Any], num_kv_heads: int, num_layers: int,
        micro_batches: int = 0,
    ) -> None:
        self.world_size = world_size
        self.micro_batches = micro_batches  # pipeline parallel: micro-batches per step (0: tensor parallel)
        self.comm = comm
        self.procs = procs
        self.num_kv_heads = num_kv_heads  # what this rank's KV cache holds
        self.num_layers = num_layers
        self.error: WorkerLostError | None = None
        self._finalizer = weakref.finalize(self, ModelParallel._stop, comm, procs)

    @classmethod
    def start(
        cls, model: nn.Module, tensor_parallel_size: int, *, pipeline_parallel_size: int = 1,
        pp_micro_batches: int | None = None, timeout_s: float | None = None,
    ) -> ModelParallel:
        """Start (or, under torchrun, join) the group and shard `model` in place as rank 0:
        `tensor_parallel_size` ranks splitting every layer, or `pipeline_parallel_size` stages
        (one of the two; both at once is not supported). `pp_micro_batches`: the most
        micro-batches a pipelined step is cut into (default: the number of stages).
        Under torchrun a rank other than 0 runs the worker loop here and exits the process.
        `timeout_s`: a collective's limit (default ``$QWENKIT_TP_TIMEOUT`` or 120 s)."""
        if timeout_s is None:
            raw = os.environ.get(TIMEOUT_ENV) or str(DEFAULT_TIMEOUT_S)
            try:
                timeout_s = float(raw)
            except ValueError:
                raise ValueError(f"{TIMEOUT_ENV}: expected seconds, got {raw!r}") from None
        if tensor_parallel_size > 1 and pipeline_parallel_size > 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size cannot both be > 1 yet")
        pipeline = pipeline_parallel_size > 1
        if pp_micro_batches is not None and pp_micro_batches < 1:
            raise ValueError(f"pp_micro_batches must be >= 1, got {pp_micro_batches}")
        world_size = pipeline_parallel_size if pipeline else tensor_parallel_size
        config = model.config
        if any(type(m).__module__.startswith("qwenkit.cpu") for m in model.modules()):
            logger.info("model parallel: the fused CPU runtime is not used (its decode step is not sharded)")
            cpu.uninstall(model)
        if pipeline:
            stage_layers(config.num_hidden_layers, 0, world_size)  # raises when it cannot split
        else:
            check_tensor_parallel(config, world_size, model)
        device = next(model.parameters()).device
        procs: list[Any] = []
        if launched_by_torchrun():
            env_world = int(os.environ["WORLD_SIZE"])
            if env_world != world_size:
                raise ValueError(f"parallel size {world_size} but torchrun started WORLD_SIZE={env_world}")
            rank = int(os.environ["RANK"])
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
                torch.cuda.set_device(device)
                model.to(device)
            if not dist.is_initialized():
                dist.init_process_group(_backend(device), timeout=_STARTUP_TIMEOUT)
            comm = _Comm(device, timeout_s)
            _shard(model, rank, world_size, pipeline, comm)
            if rank != 0:
                try:
                    _worker_loop(model, comm, rank, world_size, pipeline)
                finally:
                    dist.destroy_process_group()
                sys.exit(0)
        else:
            if dist.is_initialized():
                raise RuntimeError("torch.distributed is already initialised in this process; "
                                   "launch with torchrun or use one tensor-parallel engine at a time")  # fmt: skip
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            ctx = mp.get_context("spawn")
            threads = torch.get_num_threads()
            for rank in range(1, world_size):
                p = ctx.Process(
                    target=_spawned_worker, args=(rank, world_size, pipeline, init_method, model, threads, timeout_s),
                    name=f"qwenkit-tp{rank}", daemon=True,
                )  # fmt: skip
                p.start()
                procs.append(p)
            dist.init_process_group(_backend(device), init_method=init_method, rank=0,
                                    world_size=world_size, timeout=_STARTUP_TIMEOUT)  # fmt: skip
            comm = _Comm(device, timeout_s)
            _shard(model, 0, world_size, pipeline, comm)
        logger.info("%s parallel: %d ranks (%s), rank 0 schedules", "pipeline" if pipeline else "tensor",
                    world_size, dist.get_backend())  # fmt: skip
        kv_heads = config.num_key_value_heads if pipeline else local_kv_heads(config, world_size)
        micro = (pp_micro_batches or world_size) if pipeline else 0
        return cls(world_size, comm, procs, kv_heads, len(model.model.layers), micro)

    def setup_workers(self, kv_cache: KVCache, streaming_window: int | None, num_sink_tokens: int) -> None:
        self._send({
            "num_blocks": kv_cache.num_blocks, "block_size": kv_cache.block_size, "dtype": kv_cache.dtype,
            "kv_cache_dtype": kv_cache.kv_cache_dtype,
            "streaming_window": streaming_window, "num_sink_tokens": num_sink_tokens,
            "micro_batches": self.micro_batches,
        })  # fmt: skip

    def check_workers(self) -> None:
        if self.error is not None:
            raise self.error
        for i, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                self.error = WorkerLostError(f"tensor-parallel worker rank {i} exited (exit code {p.exitcode})")
                raise self.error

    def _send(self, obj: Any) -> None:
        self.check_workers()
        try:
            self.comm.send(obj)
        except RuntimeError as e:  # a peer closed the connection or the timeout passed
            self.error = WorkerLostError(f"tensor-parallel group failed: {e}")
            raise self.error from e

    def send_step(self, inputs: StepInputs) -> StepPlan:
        plan = StepPlan.from_inputs(inputs)
        self._send(plan)
        return plan

    def guard(self, e: RuntimeError) -> RuntimeError:
        """The error to raise for `e`, raised during the forward: a `WorkerLostError` when a
        collective failed or a worker is gone, else `e` itself."""
        for p in self.procs:  # a reset connection usually means the peer just died: let it exit
            p.join(timeout=1)
        try:
            self.check_workers()
        except WorkerLostError as lost:
            return lost
        if isinstance(e, dist.DistError) or "gloo" in str(e):  # gloo raises plain RuntimeErrors
            self.error = WorkerLostError(f"tensor-parallel collective failed (a worker died or timed out): {e}")
            return self.error
        return e

    def shutdown(self) -> None:
        self._finalizer()

    @staticmethod
    def _stop(comm: _Comm, procs: list[Any]) -> None:
        alive = all(p.exitcode is None for p in procs)
        if alive and dist.is_initialized():
            try:
                comm.send(None)
            except RuntimeError:
                pass
        for p in procs:
            p.join(timeout=10)
            if p.exitcode is None:
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized() and procs:  # a torchrun group belongs to the launcher's script
            dist.destroy_process_group()


class ParallelModelRunner(ModelRunner):
    """Rank 0's runner: broadcasts each prepared step before running its own shard."""

    def __init__(self, model: nn.Module, kv_cache: KVCache, parallel: ModelParallel, **kwargs: Any) -> None:
        super().__init__(model, kv_cache, **kwargs)
        self.parallel = parallel
        parallel.setup_workers(kv_cache, self.streaming_window, self.num_sink_tokens)

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        inputs = super().prepare(out)
        self._plan = self.parallel.send_step(inputs)
        return inputs

    def hidden_states(self, inputs: StepInputs) -> torch.Tensor:
        if not self.parallel.micro_batches:  # tensor parallel: the plain forward, collectives inside
            return super().hidden_states(inputs)
        micro = _micro_batches(
            self.kv_cache, self._plan, self.parallel.micro_batches, self.streaming_window, self.num_sink_tokens
        )
        return run_first_stage(self.model, micro)

    def run(self, out: SchedulerOutput, score: Any = None) -> Any:
        if score:  # workers would not join the scored rows' logits collectives
            raise NotImplementedError("speculative decoding is not supported with tensor / pipeline parallel")
        try:
            return super().run(out)
        except RuntimeError as e:
            if isinstance(e, WorkerLostError):
                raise
            err = self.parallel.guard(e)
            if err is e:
                raise
            raise err from e


def add_parallel_args(g: Any) -> None:
    """`--tensor-parallel-size` / `--pipeline-parallel-size` (vLLM's flags; generate, chat, serve)."""
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N processes (torch.distributed; float weights)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers over N processes (stages; not with -tp)")
    g.add_argument("--pp-micro-batches", type=int, default=None,
                   help="pipeline parallel: cut each step into up to N micro-batches of whole sequences, "
                        "so the stages overlap (default: the number of stages; 1: no overlap)")
