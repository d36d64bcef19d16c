"""Speculative decoding (engine/spec_decode.py) on tiny random models.

Greedy: token-for-token identical to the non-speculative engine (itself checked against the
naive full-recompute oracle in test_engine_tiny.py), for n-gram and draft-model proposers, in
mixed batches with prefix caching, stop strings / stop ids / max_tokens cutting an accepted run,
streaming deltas and log-probs. Sampled: the empirical distribution of the tokens chosen by the
speculative round matches the exact distribution computed with transformers on the same weights
(chi-square goodness of fit, p > 1e-3 with fixed seeds). Every run ends with all KV blocks free.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from qwenkit.config import ModelConfig
from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.model import Qwen2ForCausalLM
from qwenkit.engine.outputs import RequestOutputKind
from qwenkit.engine.spec_decode import SpeculativeConfig, ngram_propose
from qwenkit.sampling_params import SamplingParams
from tests.engine_helpers import greedy, random_prompts, run_engine, tiny_model, token_ids
from tests.tiny import make_hf_and_ours, tiny_hf_config

MAX_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(model, spec=None, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "4MiB")
    return LLMEngine(model, kw.pop("tokenizer", None), speculative_config=spec, **kw)


def assert_no_leaks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert sum(b.ref_count for b in bm.blocks) == 0
    proposer = engine.spec.proposer if engine.spec is not None else None
    if proposer is not None and hasattr(proposer, "block_manager"):
        assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks
        assert not proposer.mirrors


# ---------------------------------------------------------------------- config and proposer
def test_ngram_propose_follows_vllm_semantics() -> None:
    t = lambda *xs: np.array(xs, dtype=np.int64)  # noqa: E731
    # vLLM's docstring example: [4,2,3] never occurred, [2,3] did; only 3 tokens follow it.
    assert ngram_propose(t(1, 2, 3, 4, 2, 3), 2, 3, 4) == [4, 2, 3]
    # The longest suffix wins over a shorter, earlier one.
    assert ngram_propose(t(5, 1, 2, 9, 5, 8, 9, 5), 1, 2, 2) == [8, 9]
    assert ngram_propose(t(5, 1, 2, 9, 5, 8, 9, 5), 1, 1, 2) == [1, 2]
    # First occurrence among equals; nothing below prompt_lookup_min; too short.
    assert ngram_propose(t(3, 1, 3, 2, 3), 1, 1, 1) == [1]
    assert ngram_propose(t(1, 2, 3, 4), 1, 3, 3) == []
    assert ngram_propose(t(5), 1, 3, 3) == []


def test_speculative_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.from_dict({"method": "ngram"})
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "bogus": 1})
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2})
    assert SpeculativeConfig.from_dict({"model": "x", "num_speculative_tokens": 3}).method == "draft_model"
    other_vocab = Qwen2ForCausalLM(ModelConfig.from_hf(tiny_hf_config(vocab_size=128)))
    with pytest.raises(ValueError, match="vocab_size 128 differs"):
        make_engine(tiny_model(seed=0), {"model": other_vocab, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="streaming_window"):
        make_engine(tiny_model(seed=0), {"method": "ngram", "num_speculative_tokens": 2}, streaming_window=32)


# ---------------------------------------------------------------------- greedy identity
@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Different lengths; two share a 40-token prefix (prefix-cache hits across requests).
    ps = random_prompts(6, 1, 50, seed=3)
    shared = random_prompts(1, 40, 40, seed=4)[0]
    return [shared + [5, 6]] + ps + [shared + [7]]


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    engine = make_engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    return token_ids(run_engine(engine, prompts, greedy(MAX_TOKENS)))


def perturbed(model: torch.nn.Module, scale: float, seed: int = 7) -> torch.nn.Module:
    """A different model of the same shape and vocabulary: the weights plus relative noise
    (so it agrees with the target often, not always)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return other


SPECS = {
    "ngram": lambda: {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
    "draft-other": lambda: {"model": perturbed(tiny_model(seed=0), 0.2), "num_speculative_tokens": 3},
    "draft-self": lambda: {"model": tiny_model(seed=0), "num_speculative_tokens": 4},
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("stagger", [0, 3], ids=["together", "staggered"])
def test_greedy_identical_to_plain_decoding(model, prompts, reference, name, stagger) -> None:
    engine = make_engine(model, SPECS[name](), max_num_seqs=4, max_num_batched_tokens=64)
    outs = run_engine(engine, prompts, greedy(MAX_TOKENS), stagger=stagger)
    assert token_ids(outs) == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    stats = engine.stats()
    assert stats["spec_decode_num_drafts"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["num_generation_tokens"] == sum(map(len, reference))
    # Fewer steps than one per token: accepted drafts really replaced decode steps.
    assert stats["num_steps"] < engine_steps_plain(model, prompts, stagger)
    if name == "draft-self":
        assert stats["spec_decode_acceptance_rate"] == 1.0
        assert stats["spec_decode_mean_acceptance_length"] > 4.0
    assert stats["prefix_cache_hits"] > 0
    assert_no_leaks(engine)


def engine_steps_plain(model, prompts, stagger) -> int:
    engine = make_engine(model, max_num_seqs=4, max_num_batched_tokens=64)
    run_engine(engine, prompts, greedy(MAX_TOKENS), stagger=stagger)
    return engine.num_steps


def test_mixed_batch_and_small_kv_cache(model, prompts, reference) -> None:
    # Different max_tokens per request (some never speculate: max_tokens 1 and 2), a KV cache
    # so small that drafts compete with prompts for blocks, and a 16-token step budget.
    params = [greedy(MAX_TOKENS if i % 3 else i % 4 + 1) for i in range(len(prompts))]
    engine = make_engine(model, SPECS["draft-other"](), max_num_seqs=8, max_num_batched_tokens=16,
                         kv_cache_memory=96 * 1024, block_size=4)  # fmt: skip
    outs = run_engine(engine, prompts, params, stagger=2)
    assert token_ids(outs) == [r[: p.max_tokens] for r, p in zip(reference, params)]
    assert_no_leaks(engine)


def test_max_tokens_and_stop_ids_cut_an_accepted_run(model, prompts, reference) -> None:
    # draft = target accepts every draft, so each limit falls inside an accepted run.
    for max_tokens in (3, 6, 7, 10):
        engine = make_engine(model, SPECS["draft-self"](), max_num_seqs=8)
        outs = run_engine(engine, prompts, greedy(max_tokens))
        assert token_ids(outs) == [r[:max_tokens] for r in reference]
        assert_no_leaks(engine)
    stop_ids = [r[7] for r in reference]
    params = [greedy(MAX_TOKENS, stop_token_ids=[s]) for s in stop_ids]
    engine = make_engine(model, SPECS["draft-self"](), max_num_seqs=8)
    outs = run_engine(engine, prompts, params)
    for out, ref, s in zip(outs, reference, stop_ids):
        o = out.outputs[0]
        assert o.token_ids == ref[: ref.index(s) + 1] and o.finish_reason == "stop" and o.stop_reason == s
    assert_no_leaks(engine)


def test_logprobs_are_the_targets(model, prompts) -> None:
    params = greedy(12, logprobs=3)
    plain = run_engine(make_engine(model, max_num_seqs=8), prompts, params)
    engine = make_engine(model, SPECS["draft-other"](), max_num_seqs=8)
    spec = run_engine(engine, prompts, params)
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    for a, b in zip(plain, spec):
        oa, ob = a.outputs[0], b.outputs[0]
        assert oa.token_ids == ob.token_ids
        assert math.isclose(oa.cumulative_logprob, ob.cumulative_logprob, rel_tol=0, abs_tol=1e-3)
        for la, lb in zip(oa.logprobs, ob.logprobs):
            assert list(la) == list(lb)  # the same top-3 ids in the same order (+ the chosen one)
            for t in la:  # fp32, different batch shapes: equal up to summation order
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_streaming_deltas_and_stop_strings(tiny_tokenizer) -> None:
    vocab = len(tiny_tokenizer)
    target = tiny_model(seed=0, vocab_size=vocab)
    spec = {"model": tiny_model(seed=0, vocab_size=vocab), "num_speculative_tokens": 4}
    prompts = random_prompts(4, 3, 30, vocab=vocab, seed=9)
    ref_engine = make_engine(target, tokenizer=tiny_tokenizer)
    refs = [o.outputs[0] for o in run_engine(ref_engine, prompts, greedy(20))]
    for i, prompt in enumerate(prompts):
        # A stop string made of the text of output tokens 6..7: found inside an accepted run.
        stop = tiny_tokenizer.decode(refs[i].token_ids[6:8])
        params = greedy(20, stop=[stop]) if stop.strip() else greedy(20)
        want = run_engine(make_engine(target, tokenizer=tiny_tokenizer), [prompt], params)[0].outputs[0]
        engine = make_engine(target, spec, tokenizer=tiny_tokenizer)
        engine.add_request("r", prompt, params, output_kind=RequestOutputKind.DELTA)
        text, ids, final = "", [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                text += out.outputs[0].text
                ids += out.outputs[0].token_ids
                final = out.outputs[0] if out.finished else final
        assert (text, ids, final.finish_reason, final.stop_reason) == (want.text, want.token_ids, want.finish_reason, want.stop_reason)
        assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
        assert_no_leaks(engine)


# ---------------------------------------------------------------------- sampled: distribution
VOCAB = 16
NUM_SAMPLES = 1500
SCALE = 12.0  # lm_head multiplier: peaked distributions, so drafts are both accepted and rejected


def _exact_pairs(ref, prompt: list[int], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact P(t1, t2) and P(t2, t3) (marginal over t1) from transformers: (V, V) each."""
    v = VOCAB
    with torch.no_grad():
        def probs(seqs: list[list[int]]) -> torch.Tensor:
            logits = ref(torch.tensor(seqs)).logits[:, -1].double()
            return (logits / temperature).softmax(-1)

        p1 = probs([prompt])[0]  # (V,)
        p2 = probs([prompt + [a] for a in range(v)])  # (V, V): [t1, t2]
        p3 = probs([prompt + [a, b] for a in range(v) for b in range(v)]).view(v, v, v)  # [t1, t2, t3]
    joint12 = p1[:, None] * p2
    joint23 = (joint12[:, :, None] * p3).sum(0)
    return joint12.numpy(), joint23.numpy()


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one."""
    counts, probs = counts.ravel(), probs.ravel() / probs.sum()
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    stat = float(((obs[keep] - e[keep]) ** 2 / e[keep]).sum())
    dof = int(keep.sum()) - 1
    # chi2 survival function = regularized upper incomplete gamma Q(dof / 2, stat / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def _tiny_pair(seed: int):
    ref, ours = make_hf_and_ours(seed=seed, vocab_size=VOCAB)
    with torch.no_grad():
        ref.lm_head.weight.mul_(SCALE)
        ours.lm_head.weight.mul_(SCALE)
    return ref, ours


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_tokens_keep_the_target_distribution(method) -> None:
    ref, target = _tiny_pair(seed=0)
    temperature = 1.0 if method == "ngram" else 0.8
    if method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    else:
        spec = {"model": perturbed(target, 0.3), "num_speculative_tokens": 2}
    # Every token, then the model's own greedy continuation: the n-gram always finds a match,
    # and it is often the likely token.
    prompt = list(range(VOCAB))
    with torch.no_grad():
        for _ in range(12):
            prompt.append(int(ref(torch.tensor([prompt])).logits[0, -1].argmax()))
    # t1 comes from the prefill; with max_tokens 3 the next step speculates one draft, so t2 is
    # the verified (accepted or resampled) token and t3 the bonus or the next plain step.
    params = SamplingParams(n=NUM_SAMPLES, temperature=temperature, max_tokens=3, seed=1234, ignore_eos=True)
    engine = make_engine(target, spec, max_num_seqs=NUM_SAMPLES, max_num_batched_tokens=64 * NUM_SAMPLES,
                         block_size=4, kv_cache_memory="128MiB")  # fmt: skip
    out = run_engine(engine, [prompt], params)[0]
    toks = np.array([o.token_ids for o in out.outputs])  # (N, 3)
    stats = engine.stats()
    assert stats["spec_decode_num_drafts"] == NUM_SAMPLES  # every sample went through one round
    assert 0.1 < stats["spec_decode_acceptance_rate"] < 0.9  # both branches are exercised
    joint12, joint23 = _exact_pairs(ref, prompt, temperature)
    c12 = np.zeros((VOCAB, VOCAB))
    np.add.at(c12, (toks[:, 0], toks[:, 1]), 1)
    c23 = np.zeros((VOCAB, VOCAB))
    np.add.at(c23, (toks[:, 1], toks[:, 2]), 1)
    p12, p23 = _chi2_pvalue(c12, joint12), _chi2_pvalue(c23, joint23)
    assert p12 > 1e-3 and p23 > 1e-3, (p12, p23)
    # Total variation of the t2 marginal: at N = 1500 and 16 cells its expectation is < 0.04.
    tv = 0.5 * np.abs(c12.sum(0) / NUM_SAMPLES - joint12.sum(0)).sum()
    assert tv < 0.07, tv
    assert_no_leaks(engine)


# ---------------------------------------------------------------------- CLI and /metrics
def test_cli_flags_and_generate_end_to_end(tiny_hf_dir, capsys) -> None:
    import argparse
    import json

    from qwenkit.cli.main import build_parser, engine_kwargs, main
    from qwenkit.serve.cli import add_serve_parser, settings_from_args

    args = build_parser().parse_args(["generate", "m", "--speculative-method", "ngram", "--num-speculative-tokens", "3"])
    assert engine_kwargs(args)["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    args = build_parser().parse_args(["generate", "m", "--speculative-model", "d", "-q", "int8"])
    assert engine_kwargs(args)["speculative_config"] == {"model": "d", "num_speculative_tokens": 4, "quantization": "int8"}
    with pytest.raises(ValueError, match="--num-speculative-tokens needs"):
        engine_kwargs(build_parser().parse_args(["generate", "m", "--num-speculative-tokens", "3"]))
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    s = settings_from_args(parser.parse_args(["serve", "m", "--speculative-method", "ngram", "--prompt-lookup-max", "2"]))
    assert s.engine_args["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2}

    def generate(*flags: str) -> dict:
        assert main(["generate", "-m", str(tiny_hf_dir), "-q", "none", "-t", "0", "-n", "16", "--ignore-eos", "--json",
                     *flags, "abc abc abc abc"]) == 0  # fmt: skip
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    plain = generate()
    for flags in (["--speculative-method", "ngram"], ["--speculative-model", str(tiny_hf_dir), "--num-speculative-tokens", "2"]):
        out = generate(*flags)
        assert (out["token_ids"], out["text"]) == (plain["token_ids"], plain["text"])


def test_metrics_report_acceptance(model, prompts) -> None:
    from types import SimpleNamespace

    from qwenkit.serve.engine_client import AsyncEngineClient
    from qwenkit.serve.metrics import ServerMetrics

    engine = make_engine(model, SPECS["draft-other"](), max_num_seqs=8)
    run_engine(engine, prompts, greedy(MAX_TOKENS))
    s = engine.stats()
    stats = AsyncEngineClient.stats(SimpleNamespace(core=engine))
    text = ServerMetrics("m", lambda: stats).render().decode()

    def value(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(f"qwenkit:{name}{{"))
        return float(line.rsplit(" ", 1)[1])

    assert value("spec_decode_num_drafts_total") == s["spec_decode_num_drafts"] > 0
    assert value("spec_decode_num_accepted_tokens_total") == s["spec_decode_num_accepted_tokens"]
    assert value("spec_decode_num_draft_tokens_total") == s["spec_decode_num_draft_tokens"]
    rate = s["spec_decode_num_accepted_tokens"] / s["spec_decode_num_draft_tokens"]
    assert 0 < rate < 1 and abs(value("spec_decode_acceptance_rate") - rate) < 1e-9
    assert abs(value("spec_decode_mean_acceptance_length") - (1 + s["spec_decode_num_accepted_tokens"] / s["spec_decode_num_drafts"])) < 1e-9
