"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", eq. 1): with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k), computed as a
product to stay exact for large n."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(outcomes: Mapping[str, Sequence[bool]], ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over problems, in percent, for every k that every problem has samples for."""
    if not outcomes:
        return {}
    counts = [(len(v), sum(bool(x) for x in v)) for v in outcomes.values()]
    n_min = min(n for n, _ in counts)
    return {
        f"pass@{k}": 100.0 * sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
        for k in sorted(set(ks))
        if 1 <= k <= n_min
    }
