"""The paged engine against the naive full-recompute oracle, on tiny random models (seconds)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenkit.engine.llm_engine import LLMEngine
from qwenkit.engine.outputs import RequestOutputKind
from qwenkit.sampling_params import SamplingParams
from tests.engine_helpers import greedy, naive_greedy, random_prompts, run_engine, tiny_model, token_ids

MAX_TOKENS = 10
KIB_PER_TOKEN = 1  # tiny model: 4 layers * (K+V) * 2 kv heads * 16 dims * 4 bytes = 1 KiB


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(32, 1, 60, seed=1)


@pytest.fixture(scope="module")
def reference(model, prompts) -> list[list[int]]:
    return [naive_greedy(model, p, MAX_TOKENS) for p in prompts]


def make_engine(model, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory", "2MiB")
    return LLMEngine(model, None, **kw)


@pytest.mark.parametrize("stagger", [0, 3], ids=["together", "staggered"])
def test_matches_naive_greedy(model, prompts, reference, stagger) -> None:
    # 64-token budget: long prompts are chunked and mixed with decodes of other requests.
    engine = make_engine(model, max_num_seqs=8, max_num_batched_tokens=64)
    outs = run_engine(engine, prompts, greedy(MAX_TOKENS), stagger=stagger)
    assert token_ids(outs) == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_any_block_size(model, prompts, reference, block_size) -> None:
    engine = make_engine(model, block_size=block_size, max_num_seqs=16, max_num_batched_tokens=48)
    assert token_ids(run_engine(engine, prompts, greedy(MAX_TOKENS), stagger=5)) == reference


def test_decodes_mixed_with_prefill_chunks(model) -> None:
    """A long prompt is split across steps while a running stream keeps decoding every step."""
    engine = make_engine(model, max_num_seqs=4, max_num_batched_tokens=16)
    short, long = random_prompts(2, 5, 5, seed=7)[0], random_prompts(1, 200, 200, seed=8)[0]
    engine.add_request("short", short, greedy(40))
    engine.step()  # prefill of the short prompt
    engine.add_request("long", long, greedy(2))
    steps_with_short_token = 0
    for _ in range(12):
        outs = {o.request_id: o for o in engine.step()}
        steps_with_short_token += "short" in outs
    assert steps_with_short_token == 12  # the 200-token prompt never stalls the stream
    finals = {o.request_id: o for o in run_engine_rest(engine)}
    assert finals["long"].outputs[0].token_ids == naive_greedy(model, long, 2)


def run_engine_rest(engine: LLMEngine):
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    return finals


def test_prefix_cache_hit_equals_miss(model) -> None:
    system = random_prompts(1, 50, 50, seed=3)[0]
    tails = random_prompts(4, 3, 9, seed=4)
    convs = [system + t for t in tails]
    ref = [naive_greedy(model, p, MAX_TOKENS) for p in convs]
    for block_size in (1, 16):
        engine = make_engine(model, block_size=block_size, enable_prefix_caching=True)
        first = run_engine(engine, [convs[0]], greedy(MAX_TOKENS))
        misses = engine.block_manager.prefix_cache_misses
        assert engine.block_manager.prefix_cache_hits == 0
        # The rest share the 50-token system prompt: only their tails are prefilled.
        computed = engine.num_prompt_tokens_computed
        rest = run_engine(engine, convs[1:], greedy(MAX_TOKENS))
        assert token_ids(first + rest) == ref
        full_blocks = 50 // block_size
        assert engine.block_manager.prefix_cache_hits >= 3 * full_blocks
        assert engine.block_manager.prefix_cache_misses - misses <= 3 * (9 // block_size + 1)
        saved = 3 * full_blocks * block_size
        assert engine.num_prompt_tokens_computed - computed <= sum(map(len, convs[1:])) - saved
        assert all(o.num_cached_tokens >= full_blocks * block_size for o in rest)
        # A second chat turn: history (prompt + reply) + new user tokens only prefills the new part.
        turn2 = convs[0] + first[0].outputs[0].token_ids + tails[1]
        before = engine.num_prompt_tokens_computed
        out2 = run_engine(engine, [turn2], greedy(MAX_TOKENS))
        assert token_ids(out2) == [naive_greedy(model, turn2, MAX_TOKENS)]
        assert engine.num_prompt_tokens_computed - before <= len(tails[1]) + 1 + block_size
        # The original request again, now served from shared blocks: same output.
        assert token_ids(run_engine(engine, [convs[0]], greedy(MAX_TOKENS))) == ref[:1]


def test_shared_blocks_while_running(model) -> None:
    """Two requests share cached blocks *concurrently*; both stay correct."""
    base = random_prompts(1, 40, 40, seed=11)[0]
    engine = make_engine(model, block_size=8, max_num_seqs=4)
    run_engine(engine, [base], greedy(2))  # warm the cache
    a, b = base + [1, 2, 3], base + [4, 5]
    outs = run_engine(engine, [base, a, b], greedy(MAX_TOKENS))
    assert token_ids(outs) == [naive_greedy(model, p, MAX_TOKENS) for p in (base, a, b)]
    assert engine.block_manager.prefix_cache_hits >= 3 * (40 // 8) - 1


def test_tiny_pool_preempts_and_completes(model, prompts, reference) -> None:
    # 128 token slots for 32 requests of up to 70 tokens: constant preemption by recompute.
    engine = make_engine(
        model, block_size=16, max_num_seqs=32, max_num_batched_tokens=64, kv_cache_memory=128 * 1024
    )
    assert engine.kv_cache.num_slots == 128
    outs = run_engine(engine, prompts, greedy(MAX_TOKENS), stagger=4)
    assert token_ids(outs) == reference
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # Without prefix caching, recompute must still give the same tokens.
    engine = make_engine(
        model, block_size=4, max_num_seqs=32, max_num_batched_tokens=40,
        kv_cache_memory=80 * 1024, enable_prefix_caching=False,
    )  # fmt: skip
    assert token_ids(run_engine(engine, prompts, greedy(MAX_TOKENS))) == reference
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("slots", [1, 2])
def test_priority_first(model, slots) -> None:
    """Saturated engine: a high-priority request submitted last overtakes earlier low ones."""
    engine = make_engine(model, max_num_seqs=slots, max_num_batched_tokens=64)
    low = random_prompts(6, 10, 20, seed=5)
    for i, p in enumerate(low):
        engine.add_request(f"low{i}", p, greedy(12), priority=1)
    engine.step()
    engine.step()
    high = random_prompts(1, 10, 20, seed=6)[0]
    engine.add_request("high", high, greedy(12), priority=0)  # lower value = served first (vLLM)
    finals = run_engine_rest(engine)
    order = [o.request_id for o in finals]
    # With one slot the running low stream is preempted; with two, the later-arrived one is,
    # and only the stream that was already ahead may finish first.
    assert order.index("high") <= slots - 1, order
    assert engine.scheduler.num_preemptions >= 1
    by_id = {o.request_id: o.outputs[0].token_ids for o in finals}
    assert by_id["high"] == naive_greedy(model, high, 12)
    assert [by_id[f"low{i}"] for i in range(6)] == [naive_greedy(model, p, 12) for p in low]


def test_abort_frees_every_block(model) -> None:
    engine = make_engine(model, block_size=4, max_num_seqs=8, max_num_batched_tokens=32)
    total = engine.block_manager.num_blocks
    prompts = random_prompts(10, 20, 50, seed=9)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(50), output_kind=RequestOutputKind.DELTA)
    for _ in range(6):
        engine.step()
    assert engine.block_manager.num_free_blocks < total
    engine.abort_request([str(i) for i in range(10)])
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == sorted(str(i) for i in range(10))
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert engine.block_manager.num_free_blocks == total
    assert not engine.has_unfinished_requests()
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


class SinkWindowAttention:
    """Reference StreamingLLM attention for the naive loop: sinks + window, full recompute."""

    def __init__(self, window: int, sinks: int) -> None:
        self.window, self.sinks = window, sinks

    def attend(self, layer_idx, q, k, v, *, scale, sliding_window):
        window = min(sliding_window or self.window, self.window)
        pos = torch.arange(q.shape[1])
        diff = pos[:, None] - pos[None, :]
        mask = (diff >= 0) & ((diff < window) | (pos[None, :] < self.sinks))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )  # fmt: skip
        return out.transpose(1, 2)


@pytest.mark.parametrize(
    "cfg",
    [
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},
        {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 0},
    ],
    ids=["some_layers_slide", "all_layers_slide"],
)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_sliding_window_matches_naive(cfg, block_size) -> None:
    model = tiny_model(seed=2, **cfg)
    prompts = random_prompts(12, 1, 40, seed=12)
    ref = [naive_greedy(model, p, 16) for p in prompts]
    held = []

    def watch(engine, step):
        running = engine.scheduler.running
        held.append(max((sum(b >= 0 for b in s.block_table) for s in running), default=0))

    engine = make_engine(model, block_size=block_size, max_num_seqs=6, max_num_batched_tokens=24)
    assert token_ids(run_engine(engine, prompts, greedy(16), stagger=2, on_step=watch)) == ref
    if cfg["max_window_layers"] == 0:
        # Every layer slides: a sequence holds only the blocks its window (+1 chunk) touches.
        assert max(held) <= -(-(7 + 24) // block_size) + 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


STREAM_WINDOW, STREAM_SINKS, STREAM_TOKENS = 24, 4, 80


@pytest.fixture(scope="module")
def streaming_case(model):
    prompts = random_prompts(2, 30, 60, seed=13)  # prompts longer than max_model_len are fine
    ref_attn = SinkWindowAttention(STREAM_WINDOW, STREAM_SINKS)
    return prompts, [naive_greedy(model, p, STREAM_TOKENS, lambda n: ref_attn) for p in prompts]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_streaming_sinks_run_past_max_model_len(model, streaming_case, block_size) -> None:
    prompts, ref = streaming_case
    engine = make_engine(
        model, block_size=block_size, max_num_seqs=4, max_num_batched_tokens=16,
        max_model_len=48, streaming_window=STREAM_WINDOW, num_sink_tokens=STREAM_SINKS,
    )  # fmt: skip
    outs = run_engine(engine, prompts, greedy(STREAM_TOKENS))
    assert token_ids(outs) == ref  # == full recompute with a sinks + window mask
    assert all(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) > 48 for o in outs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_streaming_pool_smaller_than_a_sequence() -> None:
    """The pool holds 96 tokens; one stream runs to 400 tokens with bounded memory."""
    model = tiny_model(seed=0)
    engine = make_engine(
        model, block_size=8, max_num_seqs=1, max_num_batched_tokens=16, kv_cache_memory=96 * 1024,
        max_model_len=64, streaming_window=32, num_sink_tokens=4,
    )  # fmt: skip
    outs = run_engine(engine, random_prompts(1, 10, 10, seed=14), greedy(390))
    assert len(outs[0].outputs[0].token_ids) == 390


def test_max_model_len_finishes_with_length(model) -> None:
    engine = make_engine(model, max_model_len=32)
    out = run_engine(engine, [list(range(20))], greedy(100))[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 32
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("too-long", list(range(40)), greedy(1))


def test_eos_and_stop_token_ids(model, prompts, reference) -> None:
    engine = make_engine(model)
    ref = reference[0]
    stop_tok = ref[4]
    first = ref.index(stop_tok)
    p = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_tok])
    out = run_engine(engine, [prompts[0]], p)[0].outputs[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens masks the stop id until enough tokens were generated.
    p = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_tok], min_tokens=first + 2)
    out = run_engine(engine, [prompts[0]], p)[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_tok not in out.token_ids[: first + 1]


def test_seeded_sampling_independent_of_batch(model) -> None:
    prompts = random_prompts(6, 5, 30, seed=15)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = run_engine(make_engine(model), [prompts[0]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, seed=i) for i in range(5)]
    mixed_params = [seeded] + others
    for block_size, stagger in ((16, 0), (1, 2)):
        engine = make_engine(model, block_size=block_size, max_num_seqs=4, max_num_batched_tokens=32)
        order = list(range(1, 6)) + [0]  # the seeded request arrives last, into a busy batch
        outs = run_engine(
            engine, [prompts[i] for i in order], [mixed_params[i] for i in order], stagger=stagger
        )
        assert outs[-1].outputs[0].token_ids == alone
    # n > 1 draws different samples, each reproducible.
    engine = make_engine(model)
    n3 = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = run_engine(engine, [prompts[1]], n3)[0]
    b = run_engine(engine, [prompts[1]], n3)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_logprobs(model) -> None:
    engine = make_engine(model)
    prompt = random_prompts(1, 8, 8, seed=16)[0]
    out = run_engine(engine, [prompt], greedy(4, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 4
    with torch.inference_mode():
        ref = model(torch.tensor(prompt))[-1].log_softmax(-1)
    first = out.logprobs[0]
    tok = out.token_ids[0]
    assert first[tok].rank == 1 and abs(first[tok].logprob - float(ref[tok])) < 1e-4
    assert len(first) == 3
    total = sum(lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids))
    assert out.cumulative_logprob == pytest.approx(total)
