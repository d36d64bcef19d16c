"""The engine's logits processors (logit_bias, allowed_token_ids, bad_words, min_tokens,
structured_outputs) and prompt log-probs, on tiny random models: a 256-token one without a
tokenizer, and one over the real Qwen vocabulary and tokenizer for bad words and grammars."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.logits_processors import LogitsSpec, SequenceLogitsState, apply_logits_processors
from qwenkit.engine.outputs import RequestOutputKind
from qwenkit.sampling_params import SamplingParams, StructuredOutputsParams
from tests.engine_helpers import greedy, run_engine, tiny_model
from tests.serve_utils import tiny_model_dir

PROMPTS = [[5, 17, 42, 9], [100, 3], [7] * 20]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def engine_for(model: torch.nn.Module, **kw: Any) -> LLMEngine:
    return LLMEngine(model, None, max_model_len=256, **kw)


def sampled(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def outputs(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [c.token_ids for o in run_engine(engine, prompts, params) for c in o.outputs]


# ============================================================================ batched tensors
def test_apply_builds_one_additive_tensor() -> None:
    """Bias accumulates, allowed ids mask the rest, multi-token bad words ban their last token
    only after their prefix, min_tokens bans stop ids; rows without state are untouched."""
    v = 10
    logits = torch.randn(4, v)
    bias = LogitsSpec(bias_ids=torch.tensor([2, 5]), bias_values=torch.tensor([3.0, -4.0]))
    allowed = LogitsSpec(allowed_ids=torch.tensor([1, 8]), banned_ids=torch.tensor([8]))
    words = LogitsSpec(bad_sequences=((3, 4), (6, 7, 9)), history_len=2, min_tokens=2, stop_ids=torch.tensor([0]))
    states = [SequenceLogitsState(bias), None, SequenceLogitsState(allowed), SequenceLogitsState(words)]
    out = apply_logits_processors(logits, states, num_output=[0, 0, 0, 5], recent=[[], [], [], [6, 7]])
    expect = logits.clone()
    expect[0, 2] += 3.0
    expect[0, 5] -= 4.0
    expect[2] = float("-inf")
    expect[2, 1] = logits[2, 1]
    expect[3, 9] = float("-inf")  # prefix (6, 7) matched; (3, 4) did not; min_tokens is met
    assert torch.equal(out, expect)
    out = apply_logits_processors(logits, states[3:], num_output=[1], recent=[[3]])
    assert torch.isinf(out[0, [0, 4]]).all() and torch.isfinite(out[0, [1, 2, 3, 5, 6, 7, 8, 9]]).all()


def test_a_row_with_nothing_allowed_is_lifted() -> None:
    logits = torch.randn(1, 6)
    spec = LogitsSpec(allowed_ids=torch.tensor([2]), banned_ids=torch.tensor([2]))
    assert torch.equal(apply_logits_processors(logits, [SequenceLogitsState(spec)], [0], [[]]), logits)


# ============================================================================ engine, 256 tokens
@pytest.mark.parametrize("make", [greedy, sampled])
def test_logit_bias_plus_100_forces_the_token(model: torch.nn.Module, make: Any) -> None:
    params = make(8, logit_bias={77: 100.0}, seed=3, n=2) if make is sampled else make(8, logit_bias={77: 100.0})
    for ids in outputs(engine_for(model), PROMPTS, params):
        assert ids == [77] * 8


@pytest.mark.parametrize("make", [greedy, sampled])
def test_logit_bias_minus_100_bans_the_token(model: torch.nn.Module, make: Any) -> None:
    free = outputs(engine_for(model), PROMPTS, make(12, seed=5))
    banned = {ids[0] for ids in free} | {ids[3] for ids in free}
    params = make(12, seed=5, logit_bias={t: -100.0 for t in banned})
    for ids in outputs(engine_for(model), PROMPTS, params):
        assert not banned & set(ids), (banned, ids)


def test_allowed_token_ids_restrict_every_token(model: torch.nn.Module) -> None:
    allowed = [4, 90, 200]
    for params in (greedy(10, allowed_token_ids=allowed), sampled(10, allowed_token_ids=allowed, n=3, seed=1)):
        for ids in outputs(engine_for(model), PROMPTS, params):
            assert set(ids) <= set(allowed), ids


def test_min_tokens_holds_back_a_forced_eos(model: torch.nn.Module) -> None:
    eos = model.config.eos_token_ids[0]
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=3, logit_bias={eos: 100.0})
    out = run_engine(engine_for(model), PROMPTS[:1], params)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos and eos not in out.token_ids[:3]
    assert out.finish_reason == "stop"


def test_processors_do_not_touch_other_rows(model: torch.nn.Module) -> None:
    """A biased request in the batch leaves its neighbours' tokens as they are alone."""
    alone = outputs(engine_for(model), PROMPTS, greedy(10))
    mixed = outputs(engine_for(model), PROMPTS, [greedy(10), greedy(10, logit_bias={9: 100.0}), greedy(10)])
    assert mixed[0] == alone[0] and mixed[2] == alone[2] and mixed[1] == [9] * 10


def test_out_of_vocabulary_ids_are_refused(model: torch.nn.Module) -> None:
    engine = engine_for(model)
    with pytest.raises(ValueError, match="logit_bias.*256"):
        engine.add_request("a", [1, 2], SamplingParams(logit_bias={256: 1.0}))
    with pytest.raises(ValueError, match="allowed_token_ids"):
        engine.add_request("b", [1, 2], SamplingParams(allowed_token_ids=[3, 999]))
    with pytest.raises(ValueError, match="bad_words needs a tokenizer"):
        engine.add_request("c", [1, 2], SamplingParams(bad_words=["x"]))


# ============================================================================ prompt log-probs
def reference_prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        lp = model(torch.tensor(prompt)).log_softmax(-1)  # (T, V)
    return lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


@pytest.mark.parametrize("chunk", [8, 512])
def test_prompt_logprobs_match_a_full_forward(model: torch.nn.Module, chunk: int) -> None:
    """Chunked prefill, a prompt already in the prefix cache (the sequence computing prompt
    log-probs bypasses the lookup; its sibling of n=2 uses the cache), top-k alternatives."""
    prompt = list(range(30, 70))
    engine = engine_for(model, max_num_batched_tokens=chunk, max_num_seqs=4, block_size=4)
    warm = run_engine(engine, [prompt], greedy(2))[0]
    hits = engine.block_manager.prefix_cache_hits
    outs = run_engine(engine, [prompt, prompt], [greedy(3, prompt_logprobs=2, n=2), greedy(2, prompt_logprobs=0)])
    assert engine.block_manager.prefix_cache_hits > hits  # the siblings hit the cache
    assert outs[0].outputs[0].token_ids[:2] == warm.outputs[0].token_ids
    ref = reference_prompt_logprobs(model, prompt)
    for out in outs:
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(prompt) and lps[0] is None
        got = torch.tensor([lps[j][prompt[j]].logprob for j in range(1, len(prompt))])
        assert torch.allclose(got, ref, atol=1e-4)
    top = outs[0].prompt_logprobs[5]  # type: ignore[index]
    assert sorted(e.rank for e in top.values() if e.rank is not None) == [1, 2]
    assert len(outs[0].outputs) == 2


def test_prompt_logprobs_come_once_in_a_delta_stream(model: torch.nn.Module) -> None:
    engine = engine_for(model, max_num_batched_tokens=16, max_num_seqs=4)
    engine.add_request("r", list(range(40)), greedy(4, prompt_logprobs=1), output_kind=RequestOutputKind.DELTA)
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.prompt_logprobs for o in engine.step()]
    assert seen[0] is not None and len(seen[0]) == 40 and all(p is None for p in seen[1:])


# ============================================================================ real vocabulary
@pytest.fixture(scope="module")
def qwen_engine(request: pytest.FixtureRequest, qwen_tokenizer_dir: Path) -> LLMEngine:
    """A tiny random model over the tiny tokenizer, and (slow) over the real Qwen vocabulary."""
    from qwenkit.loaders.load import load

    lm = load(tiny_model_dir(request.config, qwen_tokenizer_dir), progress=False)
    return LLMEngine(lm.model, lm.tokenizer, max_model_len=512)


def test_bad_words_single_and_multi_token(qwen_engine: LLMEngine) -> None:
    tok = qwen_engine.tokenizer
    # a word that is one token with and without a leading space (vLLM bans both spellings)
    word = next(w for w in ("hello", "the", "and", "def", "in", "a") if len(tok.encode(w)) == len(tok.encode(" " + w)) == 1)
    single = tok.encode(word) + tok.encode(" " + word)
    multi = tok.encode("qwenkit")
    assert len(multi) >= 3, multi
    n = len(multi)
    prompt = tok.encode("Say it:")
    # Without bad_words these tokens are forced; with them, never produced.
    params = sampled(6, logit_bias={t: 100.0 for t in single}, bad_words=[word])
    for ids in outputs(qwen_engine, [prompt], params):
        assert not set(single) & set(ids)
    # Restricted to the word's own tokens, the word never completes, yet its last token
    # still appears where it does not finish the word.
    params = sampled(60, allowed_token_ids=multi, bad_words=["qwenkit"], seed=0)
    ids = outputs(qwen_engine, [prompt], params)[0]
    windows = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    assert tuple(multi) not in windows and multi[-1] in ids, ids


def test_grammar_row_does_not_change_its_neighbours(qwen_engine: LLMEngine) -> None:
    """A constrained request batched with unconstrained ones: every row gives the tokens it
    gives alone (greedy and seeded sampling); the grammar output validates."""
    tok = qwen_engine.tokenizer
    prompts = [tok.encode("weather as JSON:"), tok.encode("hi"), tok.encode("a b c")]
    so = StructuredOutputsParams(json=SCHEMA)
    for temperature in (0.0, 1.0):
        params = [
            SamplingParams(temperature=temperature, seed=1, max_tokens=60, structured_outputs=so),
            SamplingParams(temperature=temperature, seed=2, max_tokens=12),
            SamplingParams(temperature=temperature, seed=3, max_tokens=12),
        ]
        together = [o.outputs[0] for o in run_engine(qwen_engine, prompts, params)]
        alone = [run_engine(qwen_engine, [p], [q])[0].outputs[0] for p, q in zip(prompts, params)]
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        assert together[0].finish_reason == "stop", together[0].text
        jsonschema.validate(json.loads(together[0].text), SCHEMA)


def test_n_2_with_a_grammar_has_a_matcher_per_sequence(qwen_engine: LLMEngine) -> None:
    tok = qwen_engine.tokenizer
    so = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(temperature=1.0, n=2, seed=0, max_tokens=60, structured_outputs=so)
    out = run_engine(qwen_engine, [tok.encode("JSON:")], params)[0]
    texts = [c.text for c in out.outputs]
    assert texts[0] != texts[1]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_choice_and_ebnf(qwen_engine: LLMEngine) -> None:
    tok = qwen_engine.tokenizer
    prompt = tok.encode("x")
    cases = [
        (StructuredOutputsParams(regex=r"[a-c]{2}-\d{3}"), lambda t: re.fullmatch(r"[a-c]{2}-\d{3}", t)),
        (StructuredOutputsParams(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
        (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ")"'), lambda t: re.fullmatch(r"\(\d+\)", t)),
    ]
    for so, ok in cases:
        params = SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=60, structured_outputs=so)
        for c in run_engine(qwen_engine, [prompt], params)[0].outputs:
            assert c.finish_reason == "stop" and ok(c.text), (so, c.text)


def test_bad_grammar_names_the_field(qwen_engine: LLMEngine) -> None:
    from qwenkit.engine.structured_output import StructuredOutputError

    with pytest.raises(StructuredOutputError) as e:
        qwen_engine.add_request("bad", [1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= (")))
    assert e.value.param == "structured_outputs.grammar"
    with pytest.raises(StructuredOutputError) as e:
        qwen_engine.structured_output.compile(StructuredOutputsParams(json={"type": "objekt"}))
    assert e.value.param == "structured_outputs.json"
