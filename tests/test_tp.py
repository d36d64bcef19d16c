"""Tensor parallel (qwenkit.parallel + qwenkit.engine.parallel) against the single-process model.

Tiny random Qwen2 models, 2 gloo processes x 1 thread. Oracles: the unsharded model's logits
(fp32, relative error <= 1e-5) and its greedy tokens through the engine (identical).
"""
from __future__ import annotations

import copy
import datetime
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwenkit.config import ModelConfig
from qwenkit.model import Qwen2ForCausalLM
from tests.tiny import tiny_hf_config
from tests.engine_helpers import prompt_logprob_values

RTOL = 1e-5
CASES = {
    "kv2": dict(num_key_value_heads=2),  # KV heads split: one per rank
    "kv1_tied_odd_vocab": dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=257),  # replicated KV
}


def _model(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(ModelConfig.from_hf(tiny_hf_config(**overrides))).eval()
    with torch.no_grad():  # non-zero biases and norms, so a wrong split cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _worker_logits(port: int, models: list[Qwen2ForCausalLM], ids: list[torch.Tensor]) -> None:
    """Rank 1 of the logits test: its shard of each model, the same forwards as rank 0."""
    from qwenkit.parallel import MicroBatch, apply_pipeline_parallel, apply_tensor_parallel, run_stage

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        with torch.no_grad():
            for model, x in zip(models, ids):
                apply_tensor_parallel(copy.deepcopy(model), 1, 2)(x)
            for model, x in zip(models, ids):  # pipeline: this rank runs layers [2, 4)
                apply_pipeline_parallel(model, 1, 2)
                run_stage(model, [MicroBatch(None, torch.arange(x.shape[1]), None)], 1, 2)
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sharded_logits_equal_the_single_process_model() -> None:
    """Both cases, tensor then pipeline parallel, in one 2-process group: this process is rank 0,
    a spawned one rank 1."""
    from qwenkit.engine.parallel import _free_port
    from qwenkit.parallel import apply_pipeline_parallel, apply_tensor_parallel

    models = [_model(**CASES[c]) for c in sorted(CASES)]
    ids = [torch.randint(0, m.config.vocab_size, (1, 11)) for m in models]
    port = _free_port()
    worker = mp.get_context("spawn").Process(target=_worker_logits, args=(port, [copy.deepcopy(m) for m in models], ids))
    worker.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        for split in (apply_tensor_parallel, apply_pipeline_parallel):
            for case, model, x in zip(sorted(CASES), models, ids):
                with torch.no_grad():
                    ref = model(x)
                    got = split(copy.deepcopy(model), 0, 2)(x)
                assert got.shape == ref.shape
                rel = ((got - ref).abs().max() / ref.abs().max()).item()
                assert rel <= RTOL, f"{split.__name__} {case}: max relative error {rel:.2e}"
    finally:
        dist.destroy_process_group()
        worker.join(timeout=30)
    assert worker.exitcode == 0


# (case, how the 2 ranks split the model)
SPLITS = [("kv1_tied_odd_vocab", "tensor_parallel_size"), ("kv2", "tensor_parallel_size"), ("kv2", "pipeline_parallel_size")]


@pytest.fixture(scope="module", params=SPLITS, ids=[f"{c}-{s.split('_')[0]}" for c, s in SPLITS])
def tp_case(request: pytest.FixtureRequest):
    """(case, single-process model, LLM with 2 ranks on a copy); the lost-worker test kills its
    workers last."""
    from qwenkit.engine.llm import LLM

    case, split = request.param
    model = _model(seed=1, **CASES[case])
    os.environ["QWENKIT_TP_TIMEOUT"] = "5"  # read at start: the hung-worker case fails in 5 s
    try:
        llm = LLM(copy.deepcopy(model), **{split: 2}, **ENGINE)
    finally:
        del os.environ["QWENKIT_TP_TIMEOUT"]
    yield case, model, llm
    llm.llm_engine.shutdown()


ENGINE = dict(block_size=4, kv_cache_memory="4MiB", max_num_batched_tokens=32, max_num_seqs=4)  # chunked prefill


def test_greedy_through_llm_is_identical_with_two_ranks(tp_case) -> None:
    """Tensor (both cases) and pipeline parallel: tokens identical, log-probs within 1e-4."""
    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams

    case, model, llm = tp_case
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 23, 40)]
    # ignore_eos: all 24 tokens are compared; prompt_logprobs exercises the prompt-row logits.
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    ref = LLM(copy.deepcopy(model), **ENGINE).generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for r, o in zip(ref, got):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        lp_ref = [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]
        lp_got = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
        assert lp_got == pytest.approx(lp_ref, rel=1e-4, abs=1e-5)
        p_ref = prompt_logprob_values(r)
        p_got = prompt_logprob_values(o)
        assert p_got == pytest.approx(p_ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("split", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_ranks_serve_per_request_rope_factors(split: str) -> None:
    """Per-request YaRN (factor 1 for the short prompt, 4 for the long one) through TP = 2 and
    PP = 2 (micro-batches) gives the single-process engine's greedy tokens: the workers rotate
    with the same per-token tables."""
    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams

    model = _model(seed=2, **CASES["kv2"])
    rope = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "dynamic": True}
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    ref = LLM(copy.deepcopy(model), rope_scaling=rope, **ENGINE).generate(prompts, params, use_tqdm=False)
    plain = LLM(copy.deepcopy(model), **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(copy.deepcopy(model), rope_scaling=rope, **{split: 2}, **ENGINE)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()

    def prompt_lps(outs: list) -> list[list[float]]:
        return [prompt_logprob_values(o) for o in outs]

    assert prompt_lps(ref)[1] != pytest.approx(prompt_lps(plain)[1], rel=1e-3)  # factor 4 is in use
    assert prompt_lps(ref)[0] == prompt_lps(plain)[0]  # factor 1 is plain RoPE
    for a, b in zip(prompt_lps(got), prompt_lps(ref)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert [o.outputs[0].token_ids for o in got] == [r.outputs[0].token_ids for r in ref]


def test_a_lost_worker_is_an_error_not_a_hang(tp_case) -> None:
    """kv1 case: the worker is stopped (SIGSTOP, hangs): the step's collective times out.
    kv2 cases (TP and PP): the worker is killed: rank 0 sees its exit before the next step."""
    from qwenkit.engine.parallel import WorkerLostError
    from qwenkit.sampling_params import SamplingParams

    case, _, llm = tp_case
    hang = case.startswith("kv1")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt = list(range(2, 12))
    worker = llm.llm_engine.parallel.procs[0]
    os.kill(worker.pid, signal.SIGSTOP if hang else signal.SIGKILL)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerLostError):
            llm.generate([prompt], params, use_tqdm=False)
        assert time.monotonic() - t0 < 30
        with pytest.raises(WorkerLostError):  # stays failed: the engine cannot step any more
            llm.generate([prompt], params, use_tqdm=False)
    finally:
        if hang:
            os.kill(worker.pid, signal.SIGKILL)
        llm.llm_engine.shutdown()  # frees torch.distributed for the next test now


PP_ENGINE = dict(block_size=4, kv_cache_memory="4MiB", max_num_batched_tokens=48, max_num_seqs=8)


@pytest.fixture(scope="module")
def pp_llm():
    """(single-process model, PP = 2 LLM with up to 3 micro-batches a step)."""
    from qwenkit.engine.llm import LLM

    model = _model(seed=5, **CASES["kv2"])
    llm = LLM(copy.deepcopy(model), pipeline_parallel_size=2, pp_micro_batches=3, **PP_ENGINE)
    yield model, llm
    llm.llm_engine.shutdown()


def test_split_plan_cuts_whole_sequences_with_balanced_tokens() -> None:
    """3 decodes + prefill chunks of 20 and 9 tokens, cut 3 ways: whole sequences in order, each
    part's groups re-based to its own flat tokens, every token in exactly one part."""
    from qwenkit.engine.parallel import StepPlan, split_plan

    ql = [torch.tensor([1, 1, 1]), torch.tensor([20, 9])]
    cl = [torch.tensor([7, 8, 9]), torch.tensor([20, 30])]
    bt = [torch.arange(15).reshape(3, 5), torch.arange(15, 25).reshape(2, 5)]
    n = 32
    plan = StepPlan(torch.arange(n), torch.arange(n) + 100, torch.arange(n) + 200,
                    [(0, ql[0], cl[0], bt[0]), (3, ql[1], cl[1], bt[1])], torch.tensor([0, 1, 2, 31]), [(3, 22)])  # fmt: skip
    parts = split_plan(plan, 3)
    assert [p.input_ids.tolist() for p in parts] == [list(range(0, 3)), list(range(3, 23)), list(range(23, 32))]
    assert [[(s, q.tolist()) for s, q, _, _ in p.groups] for p in parts] == [[(0, [1, 1, 1])], [(0, [20])], [(0, [9])]]
    assert parts[2].groups[0][2].tolist() == [30] and parts[2].groups[0][3].tolist() == [list(range(20, 25))]
    assert torch.cat([p.slot_mapping for p in parts]).tolist() == plan.slot_mapping.tolist()
    two = split_plan(plan, 2)  # 16 tokens each side would cut the 20-token chunk: it goes whole
    assert [[(s, q.tolist()) for s, q, _, _ in p.groups] for p in two] == [[(0, [1, 1, 1]), (3, [20])], [(0, [9])]]
    assert len(split_plan(plan, 9)) == 5  # never more parts than sequences


def test_pipeline_micro_batches_equal_the_single_process_engine(pp_llm, monkeypatch) -> None:
    """PP = 2 with up to 3 micro-batches in flight: batches of 1, 3 and 8 sequences (chunked
    prefill, steps mixing decodes and prefill chunks) give the single-process engine's greedy
    tokens; sampled and prompt log-probs within rel 1e-4 / abs 1e-5 (micro-batches change GEMM row
    counts, so the last bits may differ)."""
    from qwenkit.engine import parallel
    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams

    model, llm = pp_llm
    seen = []  # (micro-batches, sequences per micro-batch) of each step on rank 0
    real = parallel.run_first_stage

    def record(m, micro):
        seen.append([sum(int(g.num_seqs) for g in mb.attn_metadata.groups) for mb in micro])
        return real(m, micro)

    monkeypatch.setattr(parallel, "run_first_stage", record)
    g = torch.Generator().manual_seed(6)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    ref_llm = LLM(copy.deepcopy(model), **PP_ENGINE)
    for lens in ([17], [5, 30, 12], [3, 9, 14, 21, 6, 11, 25, 8]):
        prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
        ref = ref_llm.generate(prompts, params, use_tqdm=False)
        got = llm.generate(prompts, params, use_tqdm=False)
        for r, o in zip(ref, got):
            assert o.outputs[0].token_ids == r.outputs[0].token_ids, lens
            lp_ref = [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]
            lp_got = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            assert lp_got == pytest.approx(lp_ref, rel=1e-4, abs=1e-5)
            p_ref = prompt_logprob_values(r)
            p_got = prompt_logprob_values(o)
            assert p_got == pytest.approx(p_ref, rel=1e-4, abs=1e-5)
    assert [1] in seen and [1, 1, 1] in seen  # one sequence: no cut; 3 decodes: 3 micro-batches
    assert max(len(s) for s in seen) == 3 and sum(s == [8] for s in seen) == 0


def test_a_stage_killed_with_micro_batches_in_flight_is_an_error_not_a_hang(pp_llm) -> None:
    """Rank 0 kills the stage-1 worker right after sending it the first micro-batch of a
    3-micro-batch step: the step raises WorkerLostError within seconds."""
    from qwenkit.engine.parallel import WorkerLostError
    from qwenkit.sampling_params import SamplingParams

    _, llm = pp_llm
    worker = llm.llm_engine.parallel.procs[0]
    last = llm.llm_engine.model.model.layers[-1]
    calls = []

    def kill_after_first(module, args, out):  # rank 0's last layer: micro-batch 0 goes out next
        calls.append(1)
        if len(calls) == 2:
            os.kill(worker.pid, signal.SIGKILL)

    handle = last.register_forward_hook(kill_after_first)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerLostError):
            llm.generate([list(range(2, 12 + i)) for i in range(3)], params, use_tqdm=False)
        assert time.monotonic() - t0 < 30
        assert len(calls) >= 2
    finally:
        handle.remove()
        llm.llm_engine.shutdown()


def test_bad_splits_and_unknown_modules_are_refused_with_the_field_named() -> None:
    from qwenkit.parallel import TensorParallelError, check_tensor_parallel

    cfg = ModelConfig.from_hf(tiny_hf_config(num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(TensorParallelError, match="num_attention_heads=4"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(TensorParallelError, match="intermediate_size=150"):
        check_tensor_parallel(ModelConfig.from_hf(tiny_hf_config(intermediate_size=150)), 4)
    model = _model()
    model.model.layers[1].mlp.down_proj = torch.nn.Identity()  # a module it does not know how to split
    with pytest.raises(TensorParallelError, match=r"model\.layers\.1\.mlp\.down_proj: a Identity"):
        check_tensor_parallel(model.config, 2, model)


def test_server_with_two_ranks_serves_then_fails_ready_when_a_worker_dies(tiny_tokenizer) -> None:
    """The app over a TP=2 engine: a completion equals the single-process one; a worker killed
    while a request runs gives that request an error, then /ready and /health answer 503."""
    import threading

    from fastapi.testclient import TestClient

    from qwenkit.engine.async_engine import AsyncLLMEngine
    from qwenkit.engine.llm import LLM
    from qwenkit.engine.llm_engine import LLMEngine
    from qwenkit.sampling_params import SamplingParams
    from qwenkit.serve.app import create_app
    from qwenkit.serve.engine_client import AsyncEngineClient
    from qwenkit.serve.settings import ServerSettings

    model = _model(seed=2, vocab_size=len(tiny_tokenizer), num_key_value_heads=1)
    prompt = [5, 6, 7, 8, 9]
    ref = LLM(copy.deepcopy(model), tiny_tokenizer, **ENGINE).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    engines = []

    def factory() -> AsyncEngineClient:
        core = LLMEngine(model, tiny_tokenizer, tensor_parallel_size=2, **ENGINE)
        engines.append(core)
        return AsyncEngineClient(AsyncLLMEngine(core), "tiny")

    app = create_app(ServerSettings(model="tiny", structured_warmup=False), factory)
    with TestClient(app) as c:
        deadline = time.monotonic() + 120  # spawning a worker takes seconds on a busy machine
        while c.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
        assert c.get("/ready").status_code == 200
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.text
        long = {**body, "max_tokens": 400}
        result = {}
        t = threading.Thread(target=lambda: result.update(r=c.post("/v1/completions", json=long)))
        t.start()
        while not engines[0].scheduler.running and t.is_alive():  # the request is in the batch
            time.sleep(0.01)
        os.kill(engines[0].parallel.procs[0].pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        assert result["r"].status_code >= 500 and "error" in result["r"].json()
        assert c.get("/ready").status_code == 503 and c.get("/ready").json()["status"] == "error"
        assert c.get("/health").status_code == 503
        assert c.post("/v1/completions", json=body).status_code == 503


@pytest.mark.slow
@pytest.mark.parametrize("split", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_real_05b_two_ranks_equal_one(gguf_05b_path, split: str) -> None:
    """The real 0.5B (fp32): greedy 64 tokens identical with 2 ranks (TP=2 or PP=2), prompt
    log-probs within 1e-5."""
    import gc

    from qwenkit.engine.llm import LLM
    from qwenkit.sampling_params import SamplingParams

    prompts = ["def fibonacci(n):\n    ", "# Sort a list of dicts by key\n"]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, prompt_logprobs=0)
    kw = dict(quantization="none", dtype="float32", kv_cache_memory="128MiB")
    torch.set_num_threads(2)
    llm = LLM(str(gguf_05b_path), **kw)
    ref = llm.generate(prompts, params, use_tqdm=False)
    del llm
    gc.collect()
    torch.set_num_threads(1)
    llm = LLM(str(gguf_05b_path), **{split: 2}, **kw)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    for r, o in zip(ref, got):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        p_ref = prompt_logprob_values(r)
        p_got = prompt_logprob_values(o)
        assert p_got == pytest.approx(p_ref, rel=1e-5, abs=1e-5)


def test_pp_micro_batches_flag_reaches_the_engine() -> None:
    from qwenkit.cli.main import build_parser, engine_kwargs
    from qwenkit.serve.cli import settings_from_args

    args = build_parser().parse_args(["generate", "m", "-pp", "2", "--pp-micro-batches", "4"])
    kw = engine_kwargs(args)
    assert kw["pipeline_parallel_size"] == 2 and kw["pp_micro_batches"] == 4
    assert "pp_micro_batches" not in engine_kwargs(build_parser().parse_args(["generate", "m", "-pp", "2"]))
    serve = build_parser().parse_args(["serve", "m", "-pp", "2", "--pp-micro-batches", "3"])
    assert settings_from_args(serve).engine_args["pp_micro_batches"] == 3
