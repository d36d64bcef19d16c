"""Parity on the real Qwen2.5-Coder GGUF files against transformers loading the same file (fp32).

Tolerance: max |logit diff| <= 1e-3 * max |logit| per prompt, and 64-token greedy continuations
identical token for token (both models decode with a KV cache, greedy, no EOS stop).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]


def _long_prompt() -> str:
    lines = [f"def f_{i}(x):\n    return x * {i} + {i % 7}  # helper number {i}\n" for i in range(120)]
    return "".join(lines) + "\n# Summarise what the functions above do:\n"


def _prompts(tok) -> dict[str, str]:
    return {
        "english": "The capital of France is",
        "chinese": "请用一句话介绍一下长城。",
        "code": "def quicksort(arr):\n    \"\"\"Sort a list.\"\"\"\n",
        "chat": tok.apply_chat_template(
            [{"role": "user", "content": "Write a Python function that reverses a string."}],
            add_generation_prompt=True,
        ),
        "long": _long_prompt(),
        "tools": tok.apply_chat_template(
            [{"role": "user", "content": "What's the weather in Paris?"}],
            tools=TOOLS,
            add_generation_prompt=True,
        ),
    }


@pytest.fixture(scope="module")
def models_05b(gguf_05b_path: Path):
    import transformers

    from qwenkit.loaders.load import load

    ours = load(gguf_05b_path, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_05b_path.parent, gguf_file=gguf_05b_path.name, dtype=torch.float32
    ).eval()
    return ours, ref


def _greedy_hf(ref, ids: list[int], n: int) -> list[int]:
    out = ref.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids):].tolist()


def _greedy_ours(lm, ids: list[int], n: int) -> list[int]:
    from tests.simple_loop import generate
    from qwenkit.sampling_params import SamplingParams

    ev = generate(lm.model, lm.tokenizer, ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return ev.token_ids


def test_prompts_cover_the_required_cases(models_05b) -> None:
    ours, _ = models_05b
    prompts = _prompts(ours.tokenizer)
    assert len(ours.tokenizer.encode(prompts["long"])) >= 1000
    assert "<tools>" in prompts["tools"]


@pytest.mark.parametrize("name", ["english", "chinese", "code", "chat", "long", "tools"])
def test_logits_match_transformers_05b(models_05b, name: str) -> None:
    ours, ref = models_05b
    ids = ours.tokenizer.encode(_prompts(ours.tokenizer)[name])
    x = torch.tensor([ids])
    with torch.inference_mode():
        want = ref(x).logits
        got = ours.model(x)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-3 * want.abs().max().item(), (name, diff)


@pytest.mark.parametrize("name", ["english", "chinese", "code", "chat", "tools"])
def test_greedy_64_tokens_match_transformers_05b(models_05b, name: str) -> None:
    ours, ref = models_05b
    ids = ours.tokenizer.encode(_prompts(ours.tokenizer)[name])
    with torch.inference_mode():
        assert _greedy_ours(ours, ids, 64) == _greedy_hf(ref, ids, 64)


def test_15b_parity_short(gguf_15b_path: Path) -> None:
    import gc

    import transformers

    from qwenkit.loaders.load import load

    ours = load(gguf_15b_path, progress=False)
    assert ours.config.hidden_size == 1536 and ours.config.num_hidden_layers == 28
    ids = ours.tokenizer.encode("def fibonacci(n):\n")
    with torch.inference_mode():
        got = ours.model(torch.tensor([ids]))
        mine = _greedy_ours(ours, ids, 16)
    del ours
    gc.collect()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_15b_path.parent, gguf_file=gguf_15b_path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits
        theirs = _greedy_hf(ref, ids, 16)
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()
    assert mine == theirs
