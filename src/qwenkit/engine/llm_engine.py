"""The synchronous engine: `add_request`, `step`, `abort_request`.

Each `step()` schedules one batch (decodes + prefill chunks), runs one forward, samples, applies
the stop rules (EOS, stop token ids, stop strings on detokenized text, max_tokens, max_model_len)
and returns a `RequestOutput` for every request that has something to report.

Logits processors (`logit_bias`, `allowed_token_ids`, `bad_words`, `min_tokens`,
`structured_outputs`) are turned into tensors once per request in `add_request`; each sequence
gets its own grammar matcher there, advanced as tokens are appended. Prompt log-probs are
computed by the first sequence of a request while its prompt is prefilled; that sequence skips
the prefix-cache lookup (a cached block has no logits), as vLLM does.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

import torch
from torch import nn

from qwenkit import cpu
from qwenkit.engine.block_manager import BlockManager
from qwenkit.engine.kv_cache import KVCache, check_kv_cache_dtype
from qwenkit.engine.logits_processors import LogitsSpec
from qwenkit.engine.model_runner import ModelRunner, PromptLogprobs
from qwenkit.engine.multimodal import expand_images, image_list
from qwenkit.engine.outputs import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    RequestOutputKind,
    logprob_entry,
)
from qwenkit.engine.sampler import SamplerOutput
from qwenkit.engine.scheduler import Scheduler
from qwenkit.engine.sequence import Sequence
from qwenkit.engine.spec_decode import SpecDecoder, SpeculativeConfig
from qwenkit.engine.stop import find_stop, stop_holdback
from qwenkit.engine.structured_output import StructuredOutputManager
from qwenkit.loaders.load import load
from qwenkit.model.layers import scaled_max_positions
from qwenkit.model.dca import enable_dual_chunk_attention
from qwenkit.model.qwen2_5_vl import is_vl_model
from qwenkit.sampling_params import SamplingParams
from qwenkit.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# A prompt: text, token ids, or vLLM's dict forms {"prompt": ...} / {"prompt_token_ids": [...]}.
PromptType = Union[str, list[int], Mapping[str, Any]]

DEFAULT_MAX_NUM_SEQS = 64
# CPU prefill reaches full GEMM speed well before 512 tokens; larger chunks only delay decodes.
DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU = 512
DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU = 8192


@dataclass(frozen=True)
class EngineConfig:
    """Engine arguments (vLLM names). `streaming_window` turns on StreamingLLM mode: every layer
    attends to the first `num_sink_tokens` tokens plus the last `streaming_window` ones, older
    blocks are released, and a request may grow past `max_model_len`."""

    block_size: int = 16
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_memory: int | str | None = None
    # "auto" (the model's dtype) or "int8" (per token-and-head scales; engine/kv_cache.py)
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    streaming_window: int | None = None
    num_sink_tokens: int = 4
    # Dual chunk attention ("chunk_size=...,local_size=..." or a dict; qwenkit.model.dca);
    # None: the model config's own dual_chunk_attention_config, if any
    dual_chunk_attention: str | Mapping[str, Any] | None = None
    # False: run the module as given (no fused CPU modules swapped in), e.g. a module being trained
    install_cpu_runtime: bool = True
    # vLLM's speculative_config dict (engine/spec_decode.py): n-gram prompt lookup or a draft model
    speculative_config: Mapping[str, Any] | None = None
    # > 1: shard the model over that many processes (qwenkit.engine.parallel); rank 0 schedules
    tensor_parallel_size: int = 1
    # > 1: layer ranges over that many processes; not with tensor parallel
    pipeline_parallel_size: int = 1
    # pipeline parallel: micro-batches a step is cut into so stages overlap (None: one per stage)
    pp_micro_batches: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; valid: {sorted(names)}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.streaming_window is not None and self.streaming_window < 1:
            raise ValueError(f"streaming_window must be >= 1, got {self.streaming_window}")
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be >= 0, got {self.num_sink_tokens}")
        if self.speculative_config is not None and self.streaming_window is not None:
            raise ValueError("speculative_config cannot be combined with streaming_window")
        if self.speculative_config is not None and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            raise ValueError("speculative_config cannot be combined with tensor / pipeline parallel yet")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")  # fmt: skip


class _Request:
    """Engine-side state of one request: its `n` sequences and what has been reported."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        seqs: list[Sequence],
        output_kind: RequestOutputKind,
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.seqs = seqs
        self.prompt_token_ids = seqs[0].prompt_token_ids  # one copy, shared by every output
        self.output_kind = output_kind
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.sent_tokens = [0] * len(seqs)
        self.sent_chars = [0] * len(seqs)
        self.sent_finished = [False] * len(seqs)
        self.holdback = stop_holdback(seqs[0].sampling_params.stop)
        if seqs[0].sampling_params.include_stop_str_in_output:
            self.holdback = 0
        self.sent_prompt_logprobs = False

    @property
    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        return self.seqs[0].prompt_logprobs

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt log-probs were asked for and are not all computed yet."""
        lps = self.prompt_logprobs
        return lps is not None and len(lps) < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
        *,
        generation_defaults: Mapping[str, Any] | None = None,
        image_processor: Any = None,
        **engine_args: Any,
    ) -> None:
        """`image_processor`: a `qwenkit.multimodal.processor.ImageProcessor` for a vision-language
        model (default: the one `load` attached to the model, from its preprocessor_config.json)."""
        if config is not None and engine_args:
            raise TypeError("pass either config= or engine keyword arguments, not both")
        self.config = config or EngineConfig.from_kwargs(**engine_args)
        cfg = self.config
        self.model = model
        self.tokenizer = tokenizer
        if enable_dual_chunk_attention(model, cfg.dual_chunk_attention) is not None:
            if cfg.streaming_window is not None:
                raise ValueError("dual_chunk_attention does not combine with streaming_window")
            if cfg.tensor_parallel_size > 1 or cfg.pipeline_parallel_size > 1:
                raise ValueError("dual_chunk_attention does not combine with tensor / pipeline parallel yet")
            if getattr(model.model.rotary_emb, "factors", ()):
                raise ValueError("dual_chunk_attention does not combine with per-request RoPE factors")
            logger.info("dual chunk attention: decode steps run the torch attention path (no fused C step)")
        self.model_config = model.config
        self.vl = model.vl if is_vl_model(model) else None
        if self.vl is not None:
            from qwenkit.multimodal.processor import ImageProcessor

            self.image_processor = image_processor or getattr(model, "image_processor", None) or ImageProcessor()
            if cfg.tensor_parallel_size > 1 or cfg.pipeline_parallel_size > 1 or cfg.speculative_config or cfg.streaming_window:
                raise ValueError("a vision-language model does not combine with tensor / pipeline parallel, "
                                 "speculative decoding or streaming_window yet")  # fmt: skip
        self.generation_defaults = dict(generation_defaults or {})
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.parallel = None
        if cfg.tensor_parallel_size > 1 or cfg.pipeline_parallel_size > 1:
            from qwenkit.engine.parallel import ModelParallel

            self.parallel = ModelParallel.start(
                model, cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size,
                pp_micro_batches=cfg.pp_micro_batches,
            )
        elif self.device.type == "cpu" and cfg.install_cpu_runtime:
            cpu.install(model)  # the fused C ops and one-call decode step (no-op if installed)
        mc = self.model_config

        # RoPE scaling (yarn / linear / dynamic) extends the default context to factor * original
        native = scaled_max_positions(mc.rope_scaling, mc.max_position_embeddings)
        if cfg.max_model_len and cfg.max_model_len > native:
            logger.warning(
                "max_model_len %d is beyond the %d positions the model's RoPE covers; pass "
                "--rope-scaling (e.g. yarn) to extend it", cfg.max_model_len, native,
            )  # fmt: skip
        self.max_model_len = cfg.max_model_len or native
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        self.rope_factors: tuple[float, ...] = tuple(getattr(rotary, "factors", ()))
        self._rope_factor_index = rotary.factor_index if self.rope_factors else None
        if getattr(rotary, "kind", None) == "dynamic":
            logger.warning(
                "dynamic NTK RoPE: each step's base follows the batch's longest position (cached keys keep "
                "theirs, as in transformers); yarn with \"dynamic\": true scales per request instead"
            )
        self.max_num_batched_tokens = cfg.max_num_batched_tokens or max(
            cfg.max_num_seqs,
            DEFAULT_MAX_NUM_BATCHED_TOKENS_GPU if self.device.type == "cuda"
            else DEFAULT_MAX_NUM_BATCHED_TOKENS_CPU,
        )  # fmt: skip
        self.kv_cache = KVCache.from_memory_budget(
            mc, cfg.block_size, cfg.kv_cache_memory, self.dtype, self.device,
            max_useful_tokens=cfg.max_num_seqs * (self.max_model_len + cfg.block_size),
            num_kv_heads=self.parallel.num_kv_heads if self.parallel else None,
            num_layers=self.parallel.num_layers if self.parallel else None, kv_cache_dtype=cfg.kv_cache_dtype,
        )  # fmt: skip
        capacity = self.kv_cache.num_slots
        self.streaming = cfg.streaming_window is not None
        if self.streaming:
            need = cfg.num_sink_tokens + cfg.streaming_window + self.max_num_batched_tokens
            if capacity < need + 2 * cfg.block_size:
                raise ValueError(
                    f"KV cache holds {capacity} tokens; streaming needs at least "
                    f"num_sink_tokens + streaming_window + max_num_batched_tokens + 2 blocks = "
                    f"{need + 2 * cfg.block_size}"
                )
            release_window: int | None = cfg.streaming_window
        else:
            if capacity < self.max_model_len:
                logger.warning(
                    "KV cache holds %d tokens < max_model_len %d; lowering max_model_len",
                    capacity, self.max_model_len,
                )  # fmt: skip
                self.max_model_len = capacity
            windows = {mc.layer_sliding_window(i) for i in range(mc.num_hidden_layers)}
            release_window = windows.pop() if len(windows) == 1 else None  # every layer slides

        self.block_manager = BlockManager(
            self.kv_cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            release_window=release_window,
            num_sink_tokens=cfg.num_sink_tokens if self.streaming else 0,
        )
        self.eos_token_ids = tuple(mc.eos_token_ids)
        runner_args = {"streaming_window": cfg.streaming_window, "num_sink_tokens": cfg.num_sink_tokens}
        if self.parallel is not None:
            from qwenkit.engine.parallel import ParallelModelRunner

            self.model_runner: ModelRunner = ParallelModelRunner(
                model, self.kv_cache, self.parallel, **runner_args
            )
        else:
            self.model_runner = ModelRunner(model, self.kv_cache, **runner_args)
        # The grammar compiler is built on first use (needs the tokenizer).
        self.structured_output = StructuredOutputManager(tokenizer, mc.vocab_size, self.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestOutput] = []
        self.num_prompt_tokens_computed = 0
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.spec: SpecDecoder | None = None
        if cfg.speculative_config is not None:
            self.spec = SpecDecoder(
                SpeculativeConfig.from_dict(cfg.speculative_config), model=model, tokenizer=tokenizer,
                sampler=self.model_runner.sampler, block_manager=self.block_manager, block_size=cfg.block_size,
                kv_cache_memory=cfg.kv_cache_memory, max_useful_tokens=cfg.max_num_seqs * (self.max_model_len + cfg.block_size),
                install_cpu_runtime=cfg.install_cpu_runtime,
            )  # fmt: skip

    @classmethod
    def from_pretrained(cls, model: str, **engine_args: Any) -> LLMEngine:
        """Load a registry name, .gguf file, HF folder or hub id, then build the engine."""
        loaded = load(model)
        return cls(
            loaded.model,
            loaded.tokenizer,
            generation_defaults=loaded.generation_defaults,
            **engine_args,
        )

    # ------------------------------------------------------------------ requests
    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_defaults)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
    ) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = sampling_params or self.default_sampling_params()
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        ids, mm = self._admit_images(request_id, prompt, ids)
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"request {request_id!r}: token ids must be in [0, {vocab})")
        if not self.streaming and len(ids) >= self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt has {len(ids)} tokens; max_model_len is "
                f"{self.max_model_len} (room for at least one generated token is needed)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer")
        spec = LogitsSpec.from_params(
            params, vocab_size=vocab, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer,
            structured=self.structured_output if self.tokenizer is not None else None, device=self.device,
        )  # fmt: skip
        arrival = time.monotonic() if arrival_time is None else arrival_time
        rope_index = 0
        if self._rope_factor_index is not None:
            # per-request YaRN: the smallest factor whose context holds prompt + max_tokens
            need = len(ids) + (params.max_tokens if params.max_tokens is not None else self.max_model_len)
            rope_index = self._rope_factor_index(min(need, self.max_model_len))
        seqs = []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq = Sequence(
                ids, params, request_id=request_id, index=i, priority=priority,
                arrival_time=arrival, generator=gen,
            )  # fmt: skip
            seq.rope_factor_index = rope_index
            seq.mm = mm
            if spec is not None:
                seq.logits_state = spec.new_state()
            if params.prompt_logprobs is not None and i == 0:  # one copy per request
                seq.prompt_logprobs = [None]
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, skip_special_tokens=params.skip_special_tokens
                )
            seqs.append(seq)
        req = _Request(request_id, text, seqs, output_kind, arrival)
        self._requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)

    def _admit_images(self, request_id: str, prompt: PromptType, ids: list[int]) -> tuple[list[int], Any]:
        """vLLM's multi_modal_data: the prompt's image placeholders expanded, the images processed."""
        where = f"request {request_id!r}"
        data = prompt.get("multi_modal_data") if isinstance(prompt, Mapping) else None
        images = image_list(data, where) if data else []
        if self.vl is None:
            if images:
                raise ValueError(f"{where}: images were given but the model is text-only "
                                 f"(model_type {self.model_config.model_type!r})")  # fmt: skip
            return ids, None
        if not images and self.vl.image_token_id not in ids:
            return ids, None
        return expand_images(ids, images, self.vl, self.image_processor, where)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free their blocks; their final output (finish_reason "abort")
        comes out of the next `step()`. Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self._requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                self.scheduler.finish(seq, "abort")
            req.metrics.finished_time = time.monotonic()
            out = self._make_output(req)
            if out is not None:
                self._aborted.append(out)

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (after the model's weights changed); False while requests run."""
        return self.block_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is collected)."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, self.max_model_len)
        sched = self.scheduler.schedule()
        score = self.spec.after_schedule(sched, self.scheduler) if self.spec is not None else None
        if not sched:
            assert not self.scheduler.has_unfinished(), "scheduler made no progress"
            return outputs
        now = time.monotonic()
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            req = self._requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            if (n > 1 and not (score and seq in score)) or seq.num_output_tokens == 0:
                self.num_prompt_tokens_computed += n
        result = self.model_runner.run(sched, score)
        sampled_seqs, samples = result.sample_seqs, result.samples
        spec_results = self.spec.verify(sched, result.scored) if self.spec is not None else []
        self.scheduler.advance(sched)
        self.num_steps += 1
        for chunk in result.prompt_logprobs:
            self._record_prompt_logprobs(chunk)
        if samples is None and not spec_results:
            return outputs
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        token_ids = samples.token_ids.tolist() if samples is not None else []
        appends = [(seq, token_ids[i], samples, i) for i, seq in enumerate(sampled_seqs)]
        for res in spec_results:  # speculative decoding: accepted tokens, in order, until a stop
            del res.seq.token_ids[res.base_len :]
            appends += [(res.seq, t, res.samples, j) for j, t in enumerate(res.tokens)]
        for seq, token, rows, i in appends:
            if seq.is_finished:
                continue
            self._append_token(seq, token, rows, i)
            self.num_generation_tokens += 1
            req = self._requests[seq.request_id]
            touched[seq.request_id] = req
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
        if self.spec is not None:
            self.spec.release_finished()
        for rid, req in touched.items():
            if req.finished:
                req.metrics.finished_time = now
                del self._requests[rid]
            out = self._make_output(req)
            if out is not None:
                outputs.append(out)
        return outputs

    def _append_token(self, seq: Sequence, token: int, samples: SamplerOutput, row: int) -> None:
        seq.append_token(token)
        if seq.logits_state is not None:
            seq.logits_state.accept(token)
        p = seq.sampling_params
        if p.logprobs is not None and samples.logprobs is not None:
            self._record_logprobs(seq, token, samples, row)
        stop_ids_done = seq.num_output_tokens >= p.min_tokens
        if stop_ids_done and not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", None, flush=True)
        if stop_ids_done and token in p.stop_token_ids:
            return self._finish(seq, "stop", token, flush=True)
        if seq.detokenizer is not None:
            before = len(seq.output_text)
            seq.output_text += seq.detokenizer.add(token)
            if p.stop and stop_ids_done:
                hit = find_stop(seq.output_text, p.stop, max(0, before - stop_holdback(p.stop)))
                if hit is not None:
                    end = hit[0] + (len(hit[1]) if p.include_stop_str_in_output else 0)
                    seq.output_text = seq.output_text[:end]
                    return self._finish(seq, "stop", hit[1], flush=False)
        max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if seq.num_output_tokens >= max_tokens:
            return self._finish(seq, "length", None, flush=True)
        if not self.streaming and len(seq) >= self.max_model_len:
            return self._finish(seq, "length", None, flush=True)
        return None

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, flush: bool) -> None:
        if flush and seq.detokenizer is not None:
            seq.output_text += seq.detokenizer.flush()
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)

    def _record_logprobs(self, seq: Sequence, token: int, samples: SamplerOutput, row: int) -> None:
        assert samples.logprobs is not None
        k = seq.sampling_params.logprobs or 0
        lp = float(samples.logprobs[row])
        top_ids = top_lps = None
        if k and samples.top_token_ids is not None and samples.top_logprobs is not None:
            top_ids = samples.top_token_ids[row, :k].tolist()
            top_lps = samples.top_logprobs[row, :k].tolist()
        seq.output_logprobs.append(logprob_entry(token, lp, top_ids, top_lps, self._decode_one))
        seq.cumulative_logprob += lp

    def _record_prompt_logprobs(self, chunk: PromptLogprobs) -> None:
        lps = chunk.logprobs.tolist()
        top_ids = chunk.top_token_ids.tolist() if chunk.top_token_ids is not None else None
        top_lps = chunk.top_logprobs.tolist() if chunk.top_logprobs is not None else None
        assert chunk.seq.prompt_logprobs is not None
        for j, token in enumerate(chunk.token_ids):
            top = (top_ids[j], top_lps[j]) if top_ids is not None and top_lps is not None else (None, None)
            chunk.seq.prompt_logprobs.append(logprob_entry(token, lps[j], *top, self._decode_one))

    def _decode_one(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    # ------------------------------------------------------------------ outputs
    def _make_output(self, req: _Request) -> RequestOutput | None:
        finished = req.finished
        kind = req.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if req.prompt_logprobs_pending and not finished:
            return None  # the first output carries the prompt log-probs
        delta = kind is RequestOutputKind.DELTA
        completions = []
        for i, seq in enumerate(req.seqs):
            text = seq.output_text
            visible = len(text)
            if not seq.is_finished:  # withhold what could be the start of a stop string
                visible = max(req.sent_chars[i], visible - req.holdback)
            n_tok = seq.num_output_tokens
            tokens_from = req.sent_tokens[i] if delta else 0
            chars_from = req.sent_chars[i] if delta else 0
            newly_finished = seq.is_finished and not req.sent_finished[i]
            if delta and n_tok == tokens_from and visible == chars_from and not newly_finished:
                continue
            want_lp = seq.sampling_params.logprobs is not None
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text[chars_from:visible],
                    token_ids=seq.token_ids[seq.num_prompt_tokens + tokens_from :],
                    cumulative_logprob=seq.cumulative_logprob if want_lp else None,
                    logprobs=seq.output_logprobs[tokens_from:] if want_lp else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            req.sent_tokens[i], req.sent_chars[i] = n_tok, visible
            req.sent_finished[i] = seq.is_finished
        if delta and not completions:
            return None
        first = req.seqs[0]
        prompt_logprobs = req.prompt_logprobs if not (delta and req.sent_prompt_logprobs) else None
        req.sent_prompt_logprobs = True
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_prefix_cached_tokens,
            metrics=req.metrics,
            priority=first.priority,
            prompt_logprobs=prompt_logprobs,
        )

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_cached_blocks": bm.num_cached_blocks,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "prefix_cache_misses": bm.prefix_cache_misses,
            "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_prompt_tokens_computed": self.num_prompt_tokens_computed,
            "num_generation_tokens": self.num_generation_tokens,
            "num_steps": self.num_steps,
            "num_image_encodings": getattr(self.model_runner, "num_image_encodings", 0),
            **(self.spec.stats() if self.spec is not None else {}),
        }


def add_streaming_args(g: Any) -> None:
    """StreamingLLM flags (generate, chat, serve, eval): the bounded-memory mode for endless chats."""
    g.add_argument("--streaming-window", type=int, default=None, metavar="N",
                   help="attend to the last N tokens plus the sink tokens; older KV blocks are freed, so "
                        "memory stays bounded and a request may run past --max-model-len")  # fmt: skip
    g.add_argument("--num-sink-tokens", type=int, default=None, metavar="K",
                   help="first tokens kept visible with --streaming-window (default 4)")
