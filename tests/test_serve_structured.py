"""Grammar-constrained decoding (xgrammar) on the tiny tokenizer's vocabulary and (slow) the real
Qwen one: whatever the logits, the output parses and validates; the batched bitmask equals the
per-row one; the engine hook constrains a real (tiny, random) model end to end."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from qwenkit.serve.structured import GrammarCompiler, GrammarError, GrammarLogitsProcessor, apply_grammar_bitmasks
from qwenkit.serve.tool_parser import parse_tool_calls
from tests.serve_utils import tiny_model_dir
from tests.test_tokenizer import load_ours_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "rain": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
    },
    "required": ["city", "unit", "days", "rain", "hours"],
}
TOOL_PARAMS = {
    "type": "object",
    "properties": {"location": {"type": "string", "maxLength": 5}, "unit": {"enum": ["c", "f"]}},
    "required": ["location", "unit"],
}


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir: Path) -> Any:
    """The tiny tokenizer, and (slow) the real one."""
    return load_ours_dir(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(tok: Any) -> GrammarCompiler:
    assert tok.eos_token_ids[:2] == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    return GrammarCompiler(tok, len(tok), tok.eos_token_ids)


def decode_random(tok: Any, proc: GrammarLogitsProcessor, seed: int, max_tokens: int = 1000) -> str:
    """Sample from random logits under the grammar until EOS."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = proc(out, torch.randn(len(tok), generator=gen) * 3)
        token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if token in tok.eos_token_ids:
            return tok.decode(out)
        out.append(token)
    raise AssertionError(f"no EOS after {max_tokens} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("seed", range(2))
def test_json_schema_output_always_validates(tok: Any, compiler: GrammarCompiler, seed: int) -> None:
    compiled = compiler.json_schema(SCHEMA, "response_format.json_schema.schema")
    text = decode_random(tok, GrammarLogitsProcessor(compiled, len(tok)), seed)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_output_parses(tok: Any, compiler: GrammarCompiler) -> None:
    proc = GrammarLogitsProcessor(compiler.json_object(), len(tok))
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    for _ in range(6):  # a few free tokens, then close the object greedily from the allowed set
        logits = proc(out, torch.randn(len(tok), generator=gen))
        out.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
    assert tok.decode(out).lstrip().startswith(("{", "["))


def test_forced_tool_call_parses(tok: Any, compiler: GrammarCompiler) -> None:
    compiled = compiler.tool_calls([("get_weather", TOOL_PARAMS), ("get_time", None)], "tools")
    for seed in range(2):
        text = decode_random(tok, GrammarLogitsProcessor(compiled, len(tok)), seed)
        parsed = parse_tool_calls(text)
        assert parsed.content is None and len(parsed.tool_calls) == 1, text
        call = parsed.tool_calls[0]
        args = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(args, TOOL_PARAMS)
        else:
            assert call.name == "get_time" and isinstance(args, dict)


def test_batched_bitmask_equals_per_row(tok: Any, compiler: GrammarCompiler) -> None:
    VOCAB = len(tok)
    a = compiler.json_schema(SCHEMA, "s")
    b = compiler.tool_calls([("get_weather", TOOL_PARAMS)], "tools")
    logits = torch.randn(3, VOCAB)
    history: list[list[int]] = [[], [], []]
    batched = apply_grammar_bitmasks(logits.clone(), [GrammarLogitsProcessor(a, VOCAB), None, GrammarLogitsProcessor(b, VOCAB)], history)
    rows = [GrammarLogitsProcessor(a, VOCAB)([], logits[0].clone()), logits[1], GrammarLogitsProcessor(b, VOCAB)([], logits[2].clone())]
    assert torch.equal(batched, torch.stack(rows))
    assert int(torch.isfinite(batched[0]).sum()) < VOCAB and torch.isfinite(batched[1]).all()


def test_invalid_schemas_name_the_field(compiler: GrammarCompiler) -> None:
    with pytest.raises(GrammarError) as e:
        compiler.json_schema({"type": "objekt"}, "response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema"
    with pytest.raises(GrammarError):
        compiler.json_schema(["not", "a", "schema"], "p")  # type: ignore[arg-type]
    with pytest.raises(GrammarError, match="at most"):  # would take seconds and GBs to compile
        compiler.json_schema({"type": "string", "minLength": 10**8}, "p")


def test_engine_hook_constrains_a_real_model(request: pytest.FixtureRequest, qwen_tokenizer_dir: Path) -> None:
    """A random tiny Qwen2 through the paged engine: the grammar (via the runner hook) makes its
    output valid JSON for the schema, for n=2 split into two seeded requests."""
    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.loaders.load import load
    from qwenkit.sampling_params import SamplingParams
    from qwenkit.serve.engine_client import install_logits_processor_hook, set_logits_processors

    lm = load(tiny_model_dir(request.config, qwen_tokenizer_dir), progress=False)
    VOCAB = len(lm.tokenizer)
    engine = LLMEngine(lm.model, lm.tokenizer, max_model_len=512)
    install_logits_processor_hook(engine.model_runner)
    # stop ids = the engine's, as serve/state.py builds it (a tiny model's config does not list
    # <|endoftext|>: a grammar that allowed it would let the row run on past the JSON)
    compiled = GrammarCompiler(lm.tokenizer, VOCAB, engine.eos_token_ids).json_schema(SCHEMA, "s")
    prompt = lm.tokenizer.encode("weather as JSON:")
    for i in range(2):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=200)
        set_logits_processors(params, [GrammarLogitsProcessor(compiled, VOCAB)])
        engine.add_request(f"r{i}", prompt, params)
    engine.add_request("free", prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=8))  # unconstrained row
    texts: dict[str, str] = {}
    for _ in range(400):
        for out in engine.step():
            if out.finished:
                texts[out.request_id] = out.outputs[0].text
        if not engine.has_unfinished_requests():
            break
    for i in range(2):
        jsonschema.validate(json.loads(texts[f"r{i}"]), SCHEMA)
    assert "free" in texts
