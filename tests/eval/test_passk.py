"""pass@k (Chen et al. 2021, section 2.1): closed form, brute force, edge cases, averaging."""

import itertools
import math
from fractions import Fraction

import pytest

from nanochat_jax.eval.passk import mean_pass_at_k, pass_at_k


def test_pass_at_k_equals_the_binomial_closed_form():
    """1 - C(n-c, k) / C(n, k) on every valid (n, c, k) with n <= 12."""
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_pass():
    """Brute force: draw every k-subset of the n samples and count those with a pass."""
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_accurate_where_float_binomials_overflow():
    """n = 2000, k = 1000: C(n, k) ~ 1e600 is beyond float range; compare exact rationals."""
    for c in (1, 3, 10):
        exact = 1 - Fraction(math.comb(2000 - c, 1000), math.comb(2000, 1000))
        assert pass_at_k(2000, c, 1000) == pytest.approx(float(exact), rel=1e-12)


def test_no_pass_gives_zero_and_all_passes_give_one():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # only 2 failures: any 3 samples hold a pass


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_over_problems_with_enough_samples():
    """k = 3 leaves out the problem with 2 samples; k = 5 has no problem and is left out."""
    results = {"a": [True, False], "b": [False, True, False, False]}
    means = mean_pass_at_k(results, ks=(1, 3, 5))
    assert means.keys() == {1, 3}
    assert means[1] == pytest.approx((0.5 + 0.25) / 2)
    assert means[3] == pytest.approx(0.75)  # b alone: 1 - C(3, 3) / C(4, 3)
