"""pass@k: the chance that at least one of k samples passes, estimated from n >= k samples."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k).

    Chen et al. 2021 (Codex, section 2.1), computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which
    stays in floating-point range where the binomials overflow (n = 200, k = 100).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}: draw more samples "
                         f"or ask for a smaller k")
    if n - c < k:
        return 1.0  # every k-subset holds a passing sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(results: Mapping[str, Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
    """pass@k for each k, averaged over problems (task_id -> one pass/fail per sample).

    A problem with fewer than k samples is left out of that k's mean, and a k that no problem
    has enough samples for is left out of the result.
    """
    out = {}
    for k in ks:
        scores = [pass_at_k(len(r), sum(r), k) for r in results.values() if len(r) >= k]
        if scores:
            out[k] = sum(scores) / len(scores)
    return out
