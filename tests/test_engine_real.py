"""The engine on the real Qwen2.5-Coder-0.5B GGUF with its real tokenizer (slow: minutes)."""
from __future__ import annotations

import pytest
import torch

from qwenkit.engine import LLM, LLMEngine, SamplingParams
from tests.engine_helpers import greedy, run_engine, token_ids

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "The capital of France is",
    "import numpy as np\n\n# compute the mean of each row of a matrix\n",
    "用中文介绍一下你自己。",
    "Q: What is 17 * 23?\nA:",
    "class Stack:\n    \"\"\"A LIFO stack backed by a Python list.\"\"\"\n\n"
    "    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "// A function in Rust that reverses a string\nfn reverse(s: &str) -> String {",
]


@pytest.fixture(scope="module")
def loaded(gguf_05b_path):
    from qwenkit.loaders.load import load

    return load(gguf_05b_path, progress=False)


@torch.inference_mode()
def naive_greedy_real(model, prompt: list[int], n: int) -> list[int]:
    """Full recompute with the plain model; logits only at the last position (same math)."""
    ids = list(prompt)
    for _ in range(n):
        h = model.hidden_states(torch.tensor(ids))  # (T, hidden)
        ids.append(int(model.compute_logits(h[-1:])[0].argmax()))
    return ids[len(prompt) :]


def test_real_engine_matches_naive_greedy(loaded) -> None:
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    n = 6
    ref = [naive_greedy_real(loaded.model, p, n) for p in prompts]
    # Small budget: long prompts are chunked and mixed with the decodes of earlier requests.
    engine = LLMEngine(
        loaded.model, tok, block_size=16, max_num_seqs=6, max_num_batched_tokens=32,
        kv_cache_memory="256MiB", max_model_len=512,
    )  # fmt: skip
    outs = run_engine(engine, prompts, greedy(n), stagger=2)
    assert token_ids(outs) == ref
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def llm(loaded) -> LLM:
    return LLM(loaded, kv_cache_memory="256MiB", max_model_len=1024)


def chat_ids(llm: LLM, text: str) -> list[int]:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_real_streamed_text_equals_final_text_multibyte(llm) -> None:
    prompt = {"prompt_token_ids": chat_ids(llm, "用中文写两句关于春天的诗。")}
    params = SamplingParams(temperature=0, max_tokens=40)
    final = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert any(ord(c) > 0x2E80 for c in final.text), final.text  # CJK: multi-byte UTF-8
    assert "\ufffd" not in final.text
    deltas = list(llm.stream(prompt, params))
    assert "".join(d.outputs[0].text for d in deltas if d.outputs) == final.text
    assert sum((d.outputs[0].token_ids for d in deltas if d.outputs), []) == final.token_ids
    assert final.text == llm.get_tokenizer().decode(final.token_ids, skip_special_tokens=True)


def test_real_stop_string_spanning_tokens(llm) -> None:
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": chat_ids(llm, "Write a Python function that adds two numbers.")}
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    # A stop string made of the end of one token and the start of the next.
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    stop = None
    for i in range(3, len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        if len(b) - len(a) >= 2 and len(a) - len(pieces[i - 1]) >= 2 and b.isascii():
            cand = a[-2:] + b[len(a) : len(a) + 2]
            if full.text.find(cand) == len(a) - 2:  # first occurrence is at this boundary
                stop = cand
                break
    assert stop is not None, full.text
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    streamed = "".join(d.outputs[0].text for d in llm.stream(prompt, params) if d.outputs)
    assert streamed == out.text
    keep = SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True)
    kept = llm.generate(prompt, keep, use_tqdm=False)
    assert kept[0].outputs[0].text == out.text + stop


def test_real_chat_and_prefix_cache(llm) -> None:
    conv = [{"role": "user", "content": "Name three prime numbers."}]
    first = llm.chat(conv, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert first.outputs[0].finish_reason in ("stop", "length") and first.outputs[0].text
    turn2 = conv + [
        {"role": "assistant", "content": first.outputs[0].text},
        {"role": "user", "content": "And two more?"},
    ]
    second = llm.chat(turn2, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    # The system prompt + first turn come from the prefix cache.
    assert second.num_cached_tokens >= 16 * ((len(first.prompt_token_ids) - 1) // 16)
    assert second.num_cached_tokens > 0
