"""Offline inference: `LLM(model, **engine_args).generate(prompts, sampling_params)` (vLLM API)."""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qwenkit.engine.llm_engine import LLMEngine, PromptType
from qwenkit.engine.outputs import RequestOutput, RequestOutputKind
from qwenkit.loaders.load import LoadedModel, load, parse_rope_scaling
from qwenkit.sampling_params import SamplingParams

Message = Mapping[str, Any]


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": torch.float32, "float32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}  # fmt: skip
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[dtype]


def _is_single_prompt(prompts: Any) -> bool:
    if isinstance(prompts, (str, Mapping)):
        return True
    return bool(prompts) and all(isinstance(t, int) for t in prompts)


class LLM:
    """Batch generation over the paged engine, constructed as vLLM's `LLM` is.

    `model`: a registry name, .gguf path, HF folder or hub id (loaded here); a `LoadedModel`; or
    an nn.Module (then pass `tokenizer=` for text prompts). Loading arguments: `quantization`
    (a `qwenkit.quant` method; default ``auto``, the same fast runtime format as the CLI and the
    server; ``none`` keeps the checkpoint's weights), `dtype` (``auto`` = float32, or a torch
    dtype / its name), `device`. `seed` seeds torch's global generator, so requests without a
    seed of their own are reproducible run to run (vLLM's meaning). Engine arguments use vLLM's
    names (`block_size`, `max_num_seqs`, `max_num_batched_tokens`, `enable_prefix_caching`,
    `kv_cache_memory`, `max_model_len`, `speculative_config`, `tensor_parallel_size` /
    `pipeline_parallel_size`: > 1 shards the float model over that many processes,
    `qwenkit.engine.parallel`) plus `streaming_window` / `num_sink_tokens`. `rope_scaling` (HF's
    dict or its JSON; also vLLM's ``hf_overrides={"rope_scaling": ...}``) replaces the model's RoPE
    scaling (README, Long context).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module | LoadedModel,
        tokenizer: Any = None,
        *,
        quantization: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        seed: int | None = None,
        generation_defaults: Mapping[str, Any] | None = None,
        rope_scaling: Mapping[str, Any] | str | None = None,
        hf_overrides: Mapping[str, Any] | None = None,
        **engine_args: Any,
    ) -> None:
        if seed is not None:
            torch.manual_seed(seed)
        if hf_overrides:
            unknown = sorted(set(hf_overrides) - {"rope_scaling", "rope_parameters"})
            if unknown:
                raise ValueError(f"hf_overrides: only rope_scaling / rope_parameters are supported, got {unknown}")
            rope_scaling = hf_overrides.get("rope_scaling", hf_overrides.get("rope_parameters"))
        if isinstance(model, (str, os.PathLike)):
            from qwenkit.engine.parallel import tp_quantization

            ranks = engine_args.get("tensor_parallel_size", 1) * engine_args.get("pipeline_parallel_size", 1)
            quantization = tp_quantization(quantization, ranks)
            model = load(model, dtype=_dtype(dtype), device=device, quantization=quantization, rope_scaling=rope_scaling)
            rope_scaling = None
        elif quantization is not None:
            raise ValueError(
                "quantization= applies when LLM loads the model from a name or path; quantize an "
                "nn.Module with qwenkit.quant.quantize_model first"
            )
        image_processor = engine_args.pop("image_processor", None)
        if isinstance(model, LoadedModel):
            tokenizer = tokenizer or model.tokenizer
            generation_defaults = generation_defaults or model.generation_defaults
            image_processor = image_processor or model.image_processor
            model = model.model
        if rope_scaling is not None:
            model.set_rope_scaling(parse_rope_scaling(rope_scaling))
        self.llm_engine = LLMEngine(
            model, tokenizer, generation_defaults=generation_defaults, image_processor=image_processor, **engine_args
        )
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """vLLM's `LLM.reset_prefix_cache`: forget cached prompt blocks (stale once weights change)."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    # ------------------------------------------------------------------ batch
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids or {"prompt_token_ids": ...}); the outputs
        come back in input order."""
        batch = [prompts] if _is_single_prompt(prompts) else list(prompts)  # type: ignore[list-item]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise ValueError(f"got {len(params)} sampling params for {len(batch)} prompts")
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"got {len(priority)} priorities for {len(batch)} prompts")
        engine = self.llm_engine
        ids = []
        for i, (prompt, p) in enumerate(zip(batch, params)):
            rid = str(next(self._counter))
            engine.add_request(
                rid, prompt, p,
                priority=priority[i] if priority is not None else 0,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )  # fmt: skip
            ids.append(rid)
        try:
            results = self._run_until_done(set(ids), use_tqdm)
        except BaseException:
            engine.abort_request(ids)
            raise
        return [results[rid] for rid in ids]

    def _run_until_done(self, ids: set[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        t0 = time.perf_counter()
        prompt0, gen0 = engine.num_prompt_tokens_computed, engine.num_generation_tokens
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in ids:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(
                        f"est. speed input: {(engine.num_prompt_tokens_computed - prompt0) / dt:.1f} "
                        f"toks/s, output: {(engine.num_generation_tokens - gen0) / dt:.1f} toks/s",
                        refresh=False,
                    )
                if len(results) < len(ids) and not engine.has_unfinished_requests():
                    raise RuntimeError("engine finished without returning every request")
        finally:
            if bar is not None:
                bar.close()
        return results

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Any] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; rendered with the model's chat
        template, then generated like `generate`."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = []
        for conv in conversations:
            conv, images = self._chat_images(conv, chat_template)
            prompt: dict[str, Any] = {
                "prompt_token_ids": self.apply_chat_template(
                    conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, tools=tools,
                    **(chat_template_kwargs or {}),
                ),
            }  # fmt: skip
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_images(self, conversation: Sequence[Message], chat_template: str | None) -> tuple[list[Any], list[Any]]:
        """Content parts (text, image_url, image) -> the template's messages and the loaded images
        (qwenkit.multimodal.chat); plain string contents pass through untouched."""
        if all(isinstance(m.get("content"), (str, type(None))) for m in conversation):
            return list(conversation), []
        from qwenkit.multimodal.chat import detect_content_format, load_chat_images, parse_chat_messages

        template = chat_template or self.get_tokenizer().chat_template or ""
        messages, refs = parse_chat_messages(conversation, content_format=detect_content_format(template))
        if refs and self.llm_engine.vl is None:
            raise ValueError(f"{refs[0].param}: this model is text-only and takes no images")
        return messages, load_chat_images(refs) if refs else []

    def apply_chat_template(self, conversation: Sequence[Message], **kwargs: Any) -> list[int]:
        return self.get_tokenizer().apply_chat_template(list(conversation), tokenize=True, **kwargs)

    # ------------------------------------------------------------------ streaming
    def stream(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        *,
        priority: int = 0,
    ) -> Iterator[RequestOutput]:
        """Generate one request, yielding DELTA outputs (new text/tokens) as they are final.

        Closing the iterator early aborts the request and frees its blocks. Drives the engine
        in the calling thread: do not interleave with other calls on the same LLM.
        """
        engine = self.llm_engine
        rid = str(next(self._counter))
        engine.add_request(
            rid, prompt, sampling_params, priority=priority, output_kind=RequestOutputKind.DELTA
        )
        finished = False
        try:
            while not finished:
                for out in engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                engine.abort_request(rid)
