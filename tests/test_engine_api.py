"""The offline `LLM` and the asyncio `AsyncLLMEngine` on a tiny random model (token ids only)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from qwenkit.engine import LLM, AsyncLLMEngine, LLMEngine, SamplingParams
from tests.engine_helpers import greedy, naive_greedy, random_prompts, tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_llm_generate_keeps_input_order(model) -> None:
    llm = LLM(model, kv_cache_memory="1MiB", max_num_seqs=4)
    prompts = random_prompts(6, 1, 40, seed=21)
    params = [greedy(3 + i) for i in range(6)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = [naive_greedy(model, p, 3 + i) for i, p in enumerate(prompts)]
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.finished and o.prompt_token_ids == p for o, p in zip(outs, prompts))
    assert outs[2].usage.completion_tokens == 5 and outs[2].usage.prompt_tokens == len(prompts[2])
    single = llm.generate(prompts[0], greedy(3), use_tqdm=True)  # one prompt as a token list
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="sampling params"):
        llm.generate(prompts[:2], [greedy(1)], use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", greedy(1), use_tqdm=False)
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(model, block_sise=4)


def test_llm_stream_deltas_and_early_close(model) -> None:
    llm = LLM(model, kv_cache_memory="1MiB")
    prompt = random_prompts(1, 12, 12, seed=22)[0]
    deltas = list(llm.stream(prompt, greedy(9)))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert sum((d.outputs[0].token_ids for d in deltas), []) == naive_greedy(model, prompt, 9)
    assert deltas[-1].outputs[0].finish_reason == "length"
    bm = llm.llm_engine.block_manager
    it = llm.stream(prompt, greedy(50))
    next(it)
    next(it)
    assert bm.num_free_blocks < bm.num_blocks
    it.close()  # the consumer went away: the request is aborted, its blocks come back
    assert bm.num_free_blocks == bm.num_blocks


def test_async_engine_concurrent_streams_and_abort(model) -> None:
    engine = AsyncLLMEngine(LLMEngine(model, None, kv_cache_memory="1MiB", block_size=4))
    prompts = random_prompts(5, 5, 30, seed=23)

    async def collect(i: int) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompts[i], greedy(8), request_id=f"r{i}"):
            tokens += out.outputs[0].token_ids if out.outputs else []
        return tokens

    async def aborted() -> str | None:
        reason = None
        async for out in engine.generate(prompts[0], greedy(10_000), request_id="long"):
            if out.finished:
                reason = out.outputs[0].finish_reason
            else:
                await engine.abort("long")
        return reason

    async def broken_consumer() -> None:
        async for _ in engine.generate(prompts[1], greedy(10_000), request_id="dropped"):
            break  # leaving the loop aborts the request

    async def main():
        results = await asyncio.gather(*(collect(i) for i in range(5)), aborted(), broken_consumer())
        # Let the engine thread apply the pending aborts.
        for _ in range(200):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return results

    try:
        results = asyncio.run(main())
        assert results[:5] == [naive_greedy(model, p, 8) for p in prompts]
        assert results[5] == "abort"
        bm = engine.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        with pytest.raises(ValueError, match="max_model_len"):

            async def too_long():
                async for _ in engine.generate([7] * 600, greedy(1)):
                    pass

            asyncio.run(too_long())
    finally:
        engine.shutdown()


def test_seeded_llm_generate_matches_batch_of_one(model) -> None:
    prompts = random_prompts(5, 4, 20, seed=24)
    p = SamplingParams(temperature=0.9, top_k=40, seed=99, max_tokens=10, ignore_eos=True)
    alone = LLM(model, kv_cache_memory="1MiB").generate(prompts[3], p, use_tqdm=False)
    batch = LLM(model, kv_cache_memory="1MiB", max_num_seqs=3).generate(prompts, p, use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone[0].outputs[0].token_ids


def test_llm_constructor_as_vllm_users_write_it(tiny_hf_dir) -> None:
    """LLM(path) loads with the same default runtime as the CLI/server (auto = int8), and takes
    vLLM's loading arguments by keyword."""
    from qwenkit.quant import Int8Linear

    default = LLM(model=str(tiny_hf_dir), max_model_len=64)
    lm_head = default.llm_engine.model.lm_head
    assert isinstance(lm_head, Int8Linear)
    fp32 = LLM(str(tiny_hf_dir), quantization="none", dtype="float32", seed=1, max_model_len=64)
    assert isinstance(fp32.llm_engine.model.lm_head, torch.nn.Linear)
    assert fp32.llm_engine.max_model_len == 64
    # seed= seeds the global generator: unseeded requests repeat run to run
    p = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    a = LLM(str(tiny_hf_dir), quantization="none", seed=7).generate([[1, 2, 3]], p, use_tqdm=False)
    b = LLM(str(tiny_hf_dir), quantization="none", seed=7).generate([[1, 2, 3]], p, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_hf_dir), dtype="float64")
    with pytest.raises(ValueError, match="quantization"):
        LLM(default.llm_engine.model, quantization="int8")
