"""The default runtime format on the real Qwen2.5-Coder-0.5B-Instruct GGUF (slow: minutes)."""
from __future__ import annotations

import ast
import re

import pytest
import torch

from qwenkit.loaders.quantized import save_quantized
from qwenkit.quant import resolve_method
from qwenkit.quant.quality import compare, humaneval_text, quantized_view

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_05b(gguf_05b_path):
    from qwenkit.loaders.load import load

    return load(gguf_05b_path, progress=False)


def test_default_format_top1_agreement_on_fixed_text(fp32_05b) -> None:
    ids = fp32_05b.tokenizer.encode(humaneval_text())
    method = resolve_method("auto")
    rows = compare(fp32_05b.model, ids, methods=[method], n_ctx=512, n_chunks=2)
    fp32, quant = rows
    assert quant.top1 >= 0.95, quant
    assert quant.ppl_delta_pct <= 2.0, quant  # the quality bar for the default format
    assert quant.weight_mb < 0.5 * fp32.weight_mb


def test_default_format_greedy_output_is_coherent(fp32_05b) -> None:
    from tests.simple_loop import generate
    from qwenkit.sampling_params import SamplingParams

    model = quantized_view(fp32_05b.model, resolve_method("auto"))
    tok = fp32_05b.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function `is_prime(n)` that returns True if n is prime."}],
        add_generation_prompt=True,
    )
    ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=320)
    with torch.inference_mode():
        text = generate(model, tok, ids, params, eos_token_ids=fp32_05b.config.eos_token_ids).text
    assert "def is_prime" in text, text
    code = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.S)
    src = code.group(1) if code else text[text.index("def is_prime") :]
    namespace: dict = {}
    exec(compile(ast.parse(src), "<generated>", "exec"), namespace)  # noqa: S102 - our own model's output
    assert [namespace["is_prime"](n) for n in (1, 2, 3, 4, 17, 21, 97)] == [False, True, True, False, True, False, True]


def test_quantized_checkpoint_round_trips_real_model(fp32_05b, tmp_path) -> None:
    from qwenkit.loaders.load import load

    model = quantized_view(fp32_05b.model, "mixed")
    save_quantized(model, tmp_path, tokenizer=fp32_05b.tokenizer)
    back = load(tmp_path, progress=False)
    x = torch.tensor([fp32_05b.tokenizer.encode("def quicksort(xs):\n    ")])
    with torch.inference_mode():
        assert torch.equal(back.model(x), model(x))
    assert back.tokenizer.encode("def f(): pass") == fp32_05b.tokenizer.encode("def f(): pass")


@pytest.mark.parametrize("method", ["auto", "int4-all"])
def test_fused_decode_step_bit_identical_on_real_model(fp32_05b, method, monkeypatch) -> None:
    """The one-C-call decode step (`qwenkit.cpu.decode_step`) on the real weights: 12 greedy
    decode steps for 2 sequences give exactly the logits of the per-module path."""
    from qwenkit.cpu import decode_step
    from qwenkit.engine.contiguous_cache import ContiguousKVCache

    model = quantized_view(fp32_05b.model, resolve_method(method))
    cfg = model.config
    if decode_step.plan_for(model.model) is None:
        pytest.skip("C kernels not built here")
    prompt = fp32_05b.tokenizer.encode("def quicksort(xs):\n    ")
    ids = torch.tensor([prompt, prompt[::-1]])

    def run() -> torch.Tensor:
        cache = ContiguousKVCache(cfg.num_hidden_layers, 2, ids.shape[1] + 13, cfg.num_key_value_heads, cfg.head_dim)
        out = []
        with torch.inference_mode():
            cache.begin(ids.shape[1])
            logits = model(ids, torch.arange(ids.shape[1]).expand(2, -1), cache)[:, -1]
            for t in range(ids.shape[1], ids.shape[1] + 12):
                cache.begin(1)
                logits = model(logits.argmax(-1, keepdim=True), torch.full((2, 1), t), cache)[:, -1]
                out.append(logits)
        return torch.stack(out)

    fused = run()
    monkeypatch.setattr(decode_step, "run", lambda *a, **k: None)
    assert torch.equal(fused, run())
