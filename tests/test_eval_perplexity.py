"""Perplexity follows llama-perplexity: non-overlapping n_ctx windows, second half scored."""
from __future__ import annotations

import math

import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit.eval.perplexity import perplexity
from qwenkit.model import Qwen2ForCausalLM
from tests.tiny import tiny_hf_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(ModelConfig.from_hf(tiny_hf_config())).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def _reference(model, tokens, n_ctx):
    """Straight from the definition, one window at a time, full logits."""
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nlls, running = [], []
    for c in range(n_chunk):
        w = torch.tensor(tokens[c * n_ctx : (c + 1) * n_ctx])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(w)[0].double(), -1)  # (n_ctx, V)
        for i in range(first, n_ctx - 1):
            nlls.append(-float(logp[i, tokens[c * n_ctx + i + 1]]))
        running.append(math.exp(sum(nlls) / len(nlls)))
    return nlls, running


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_the_definition(model, batch_size):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (3 * 32 + 17,), generator=g).tolist()  # a 17-token tail is dropped
    res = perplexity(model, tokens, n_ctx=32, batch_size=batch_size)
    nlls, running = _reference(model, tokens, 32)
    assert res.n_chunks == 3 and res.n_scored == 3 * (32 - 1 - 16) == len(nlls)
    assert res.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert res.running == pytest.approx(running, rel=1e-5)
    mean = sum(nlls) / len(nlls)
    var = sum(x * x for x in nlls) / len(nlls) - mean * mean
    assert res.ppl_stderr == pytest.approx(res.ppl * math.sqrt(var / (len(nlls) - 1)), rel=1e-4)
    assert res.llama_log().endswith(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_stderr:.5f}")


def test_needs_two_windows(model):
    with pytest.raises(ValueError, match="2\\*n_ctx"):
        perplexity(model, list(range(60)), n_ctx=32)


def test_max_chunks_and_bos(model):
    tokens = list(range(5, 5 + 32 * 4))
    a = perplexity(model, tokens, n_ctx=32, max_chunks=2)
    assert a.n_chunks == 2 and len(a.running) == 2
    b = perplexity(model, tokens, n_ctx=32, max_chunks=2, bos_token_id=0)
    assert b.ppl != a.ppl  # each window's first token replaced by BOS changes the context


class _Added:
    def __init__(self, content, special):
        self.content, self.special = content, special


class _FakeTokenizer:
    """Encodes characters; knows one control, one FIM-like and one user-defined added token."""

    added_tokens_decoder = {100: _Added("<|endoftext|>", True), 101: _Added("<|fim_prefix|>", False),
                            102: _Added("<tool_call>", False)}  # fmt: skip

    def encode(self, text, split_special_tokens=False):
        assert split_special_tokens
        return [ord(c) for c in text]


def test_llama_tokenize_matches_only_user_defined_added_tokens():
    from qwenkit.eval.perplexity import llama_tokenize

    ids = llama_tokenize(_FakeTokenizer(), "a<tool_call>b<|endoftext|><|fim_prefix|>")
    assert ids == [ord("a"), 102, ord("b"), *map(ord, "<|endoftext|><|fim_prefix|>")]


@pytest.mark.slow  # loads the real 0.5B twice (ours + llama.cpp)
def test_real_model_matches_llama_cpp(gguf_05b_path):
    """Same tokens and, within quantization-kernel noise, the same PPL as llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from qwenkit.eval.perplexity import llama_tokenize
    from qwenkit.loaders.load import load

    text = open(__file__, encoding="utf-8").read() * 2  # any text of >= 2 windows
    n_ctx, first = 128, 64
    llm = llama_cpp.Llama(model_path=str(gguf_05b_path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                          n_threads=2, verbose=False)  # fmt: skip
    ref_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    lm = load(gguf_05b_path, progress=False)
    ids = llama_tokenize(lm.tokenizer, text)
    assert ids == ref_ids
    nll, count = 0.0, 0
    for c in range(2):
        w = ids[c * n_ctx : (c + 1) * n_ctx]
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
        for i in range(first, n_ctx - 1):
            row = logits[i]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nll += lse - row[w[i + 1]]
            count += 1
    ref_ppl = math.exp(nll / count)
    ours = perplexity(lm.model, ids, n_ctx=n_ctx, max_chunks=2)
    assert ours.n_scored == count
    assert ours.ppl == pytest.approx(ref_ppl, rel=0.03)


@pytest.mark.parametrize("n_ctx,stride", [(16, 8), (16, 5), (16, 15), (64, 63)])
def test_sliding_matches_the_definition(model, n_ctx, stride):
    """Token t is scored once, by the first window (start k*stride) whose end passes t; its NLL is
    recomputed here from a forward pass over exactly that context."""
    from qwenkit.eval.perplexity import sliding_perplexity

    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (45,), generator=g).tolist()
    res = sliding_perplexity(model, tokens, n_ctx=n_ctx, stride=stride)
    nlls = []
    for t in range(1, len(tokens)):
        k = max(0, (t - n_ctx) // stride + 1)
        ctx = torch.tensor(tokens[k * stride : t + 1])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ctx)[0, -2].double(), -1)
        nlls.append(-float(logp[tokens[t]]))
    assert res.n_scored == len(tokens) - 1
    assert res.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    if n_ctx >= len(tokens):  # one window: the plain causal-LM loss over the whole text
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(torch.tensor(tokens)[None])[0, :-1], torch.tensor(tokens[1:]))
        assert res.n_chunks == 1 and res.nll == pytest.approx(float(loss), rel=1e-5)


def test_sliding_bad_stride(model):
    from qwenkit.eval.perplexity import sliding_perplexity

    with pytest.raises(ValueError, match="stride"):
        sliding_perplexity(model, list(range(40)), n_ctx=16, stride=16)
