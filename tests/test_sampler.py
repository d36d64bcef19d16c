"""Sampler semantics against direct formulas (vLLM / HF conventions)."""
from __future__ import annotations

import pytest
import torch

from qwenkit.engine.sampler import Sampler, apply_penalties, filter_logits
from qwenkit.sampling_params import SamplingParams


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 50, generator=_gen(0))
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 4, [[]] * 4, [[]] * 4, [None] * 4)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_penalties_match_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    got = apply_penalties(
        logits.clone(),
        prompt_ids=[[0]],
        output_ids=[[1, 1, 3]],
        presence=torch.tensor([0.5]),
        frequency=torch.tensor([0.25]),
        repetition=torch.tensor([2.0]),
    )
    # repetition (CTRL): seen = {0 (prompt), 1, 3}: positive / 2, negative * 2
    want = torch.tensor([[1.0, -2.0, 0.5, 1.5, -2.0]])
    want[0, 1] -= 2 * 0.25 + 0.5  # token 1 generated twice
    want[0, 3] -= 1 * 0.25 + 0.5
    assert torch.allclose(got, want)


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    v = 5
    keep = lambda lg: torch.isfinite(lg)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))) == [
        True, True, False, False, False]
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8 so the third token is needed too.
    assert keep(filter_logits(logits, torch.tensor([v]), torch.tensor([0.8]), torch.tensor([0.0]))) == [
        True, True, True, False, False]
    # min_p 0.3: keep p >= 0.15
    assert keep(filter_logits(logits, torch.tensor([v]), torch.tensor([1.0]), torch.tensor([0.3]))) == [
        True, True, True, False, False]


def test_sampling_follows_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(4000, 3).contiguous()
    out = Sampler()(logits, [SamplingParams(temperature=1.0)] * 4000, [[]] * 4000, [[]] * 4000, [None] * 4000)
    freq = torch.bincount(out.token_ids, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_seeded_rows_independent_of_batch() -> None:
    logits = torch.randn(3, 1000, generator=_gen(1))
    p = SamplingParams(temperature=1.0, seed=7)
    alone = Sampler()(logits[1:2], [p], [[]], [[]], [_gen(7)]).token_ids[0]
    mixed = Sampler()(
        logits, [SamplingParams(temperature=0.8), p, SamplingParams(temperature=0)],
        [[]] * 3, [[]] * 3, [None, _gen(7), None],
    ).token_ids[1]
    assert alone == mixed


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(2, 30, generator=_gen(2))
    out = Sampler()(logits, [SamplingParams(temperature=0, logprobs=3)] * 2, [[]] * 2, [[]] * 2, [None] * 2)
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.max(-1).values)
    assert torch.equal(out.top_token_ids, ref.topk(3).indices)


def test_forbidden_tokens_masked() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0)], [[]], [[]], [None], [[0]])
    assert out.token_ids.item() == 1


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"min_p": 2}, {"n": 0}]
)
def test_invalid_params_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_filter_is_batch_invariant() -> None:
    """A row's filtered logits do not depend on the other rows' top-k / top-p / min-p (an
    unfiltered row beside a top-p row used to lose its tail to the fp32 cumulative sum)."""
    v = 151936
    logits = torch.randn(4, v, generator=_gen(3)) * 4
    top_k = torch.tensor([v, 5, v, 40])
    top_p = torch.tensor([1.0, 0.5, 0.9, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05])
    together = filter_logits(logits, top_k, top_p, min_p)
    for i in range(4):
        alone = filter_logits(logits[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], min_p[i : i + 1])
        assert torch.equal(together[i : i + 1], alone), i
    assert torch.equal(together[0], logits[0])  # no filter asked: untouched
    assert int(torch.isfinite(together[1]).sum()) <= 5
