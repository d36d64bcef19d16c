"""What the server needs from an engine, and the adapter to qwenkit's `AsyncLLMEngine`.

`EngineClient` is the whole contract: an async generator of DELTA `RequestOutput`s per request
(leaving it early aborts the request), `abort`, `stats` for /metrics, `shutdown`, grammar
compilation ahead of submission, plus the tokenizer and limits the handlers validate against.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Protocol

import torch

from qwenkit.engine.outputs import RequestOutput
from qwenkit.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    num_kv_blocks: int = 0
    num_kv_blocks_used: int = 0  # blocks referenced by a live sequence (cached free ones excluded)
    block_size: int = 0
    prefix_cache_queries: int = 0  # prompt tokens (in full blocks) looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    num_preemptions: int = 0
    spec_decode_num_drafts: int = 0  # speculative decoding: verifications, draft / accepted tokens
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.num_kv_blocks_used / self.num_kv_blocks if self.num_kv_blocks else 0.0


class EngineClient(Protocol):
    model_name: str
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    generation_defaults: Mapping[str, Any]
    supports_images: bool  # a vision model: generate() takes multi_modal_data={"image": [...]}

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, priority: int = 0,
        multi_modal_data: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """DELTA outputs until one with `finished=True`; closing the iterator early aborts.
        `multi_modal_data` is passed only with images, so text-only clients may omit it."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def compile_structured_output(self, so: StructuredOutputsParams) -> None:
        """Compile (and cache) a request's grammar before it is submitted, so that the engine
        thread does not stall on it. Blocking: call from a worker thread. Raises
        `StructuredOutputError` (naming the field), or ImportError without xgrammar."""
        ...

    def warm_up_structured_output(self) -> None:
        """Build the grammar compiler for the vocabulary now rather than on first use."""
        ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...


class AsyncEngineClient:
    """`EngineClient` over `qwenkit.engine.AsyncLLMEngine` (one stepping thread)."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.async_engine = engine
        core = engine.engine  # the LLMEngine
        self.core = core
        self.model_name = model_name
        self.tokenizer = core.tokenizer
        self.max_model_len = int(core.max_model_len)
        self.vocab_size = int(core.model_config.vocab_size)
        self.eos_token_ids = tuple(core.eos_token_ids)
        self.generation_defaults = dict(core.generation_defaults)
        self.supports_images = getattr(core, "vl", None) is not None

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, priority: int = 0,
        multi_modal_data: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        prompt: Any = prompt_token_ids
        if multi_modal_data:
            prompt = {"prompt_token_ids": prompt_token_ids, "multi_modal_data": multi_modal_data}
        agen = self.async_engine.generate(prompt, params, request_id, priority=priority)
        try:
            async for out in agen:
                yield out
        finally:
            await agen.aclose()  # aborts the request if it did not finish

    async def abort(self, request_id: str) -> None:
        await self.async_engine.abort(request_id)

    def compile_structured_output(self, so: StructuredOutputsParams) -> None:
        self.core.structured_output.compile(so)  # thread-safe; the engine finds it cached

    def warm_up_structured_output(self) -> None:
        self.core.structured_output.compiler()

    def stats(self) -> EngineStats:
        core = self.core
        s = core.stats()
        bm = core.block_manager
        bs = bm.block_size
        return EngineStats(
            num_requests_running=s["num_running"],
            num_requests_waiting=s["num_waiting"],
            num_kv_blocks=s["num_blocks"],
            num_kv_blocks_used=s["num_blocks"] - s["num_free_blocks"],
            block_size=bs,
            prefix_cache_queries=(s["prefix_cache_hits"] + s["prefix_cache_misses"]) * bs,
            prefix_cache_hits=s["prefix_cache_hits"] * bs,
            num_preemptions=s["num_preemptions"],
            spec_decode_num_drafts=s.get("spec_decode_num_drafts", 0),
            spec_decode_num_draft_tokens=s.get("spec_decode_num_draft_tokens", 0),
            spec_decode_num_accepted_tokens=s.get("spec_decode_num_accepted_tokens", 0),
        )

    @property
    def errored(self) -> BaseException | None:
        """Why the stepping thread died (e.g. a tensor-parallel worker was lost), else None."""
        return self.async_engine.errored

    def shutdown(self) -> None:
        self.async_engine.shutdown()
        self.core.shutdown()  # tensor-parallel workers, if any


def load_engine_client(
    model: str | os.PathLike[str],
    *,
    served_model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quantization: str = "none",
    lora: str | os.PathLike[str] | None = None,
    rope_scaling: Any = None,
    **engine_args: Any,
) -> AsyncEngineClient:
    """Load a registry name / .gguf / HF folder / hub id and start the async engine on it.

    `quantization`: runtime weight format (`qwenkit.loaders.load.load`); `qwenkit serve`
    passes its `--quantization` (default ``auto``). `lora`: a LoRA adapter folder merged into the
    weights at load (before quantizing); the served name stays the base model's."""
    from qwenkit.engine.async_engine import AsyncLLMEngine
    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.loaders.load import load

    loaded = load(
        model, dtype=dtype, device=device, progress=False, quantization=quantization, lora=lora,
        rope_scaling=rope_scaling,
    )  # fmt: skip
    core = LLMEngine(
        loaded.model, loaded.tokenizer, generation_defaults=loaded.generation_defaults,
        image_processor=getattr(loaded, "image_processor", None), **engine_args,
    )  # fmt: skip
    name = served_model_name or loaded.source.name or Path(str(model)).name
    return AsyncEngineClient(AsyncLLMEngine(core), name)
