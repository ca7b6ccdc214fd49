"""Clopper-Pearson intervals against published values (and their defining tail equations)."""

import math

import pytest

from zoo.evaluate.record import Accuracy
from zoo.evaluate.stats import betainc, clopper_pearson


@pytest.mark.parametrize("k, n, lower, upper", [
    (0, 10, 0.0, 0.308497), (10, 10, 0.691503, 1.0), (5, 10, 0.187086, 0.812914), (3, 4, 0.194120, 0.993690),
    (1, 1, 0.025, 1.0),
])
def test_known_intervals(k, n, lower, upper):
    lo, hi = clopper_pearson(k, n)
    assert lo == pytest.approx(lower, abs=1e-6) and hi == pytest.approx(upper, abs=1e-6)


@pytest.mark.parametrize("k, n", [(1, 7), (331, 1000), (6556, 10000), (9999, 10000)])
def test_bounds_solve_the_binomial_tail_equations(k, n):
    lo, hi = clopper_pearson(k, n)

    def tail_at_least(p):   # P(X >= k) for X ~ Bin(n, p) = I_p(k, n - k + 1)
        return betainc(k, n - k + 1, p)

    assert tail_at_least(lo) == pytest.approx(0.025, rel=1e-6)
    assert 1 - betainc(k + 1, n - k, hi) == pytest.approx(0.025, rel=1e-6)   # P(X <= k) at the upper bound
    assert lo < k / n < hi


def test_betainc_symmetry_and_a_closed_form():
    assert betainc(2.5, 4.0, 0.3) == pytest.approx(1 - betainc(4.0, 2.5, 0.7), abs=1e-12)
    assert betainc(1, 3, 0.2) == pytest.approx(1 - 0.8 ** 3, abs=1e-12)   # I_x(1, b) = 1 - (1 - x)^b
    assert math.isclose(betainc(5, 5, 0.5), 0.5, abs_tol=1e-12)


def test_accuracy_carries_its_interval_in_percent():
    acc = Accuracy(2, 4)
    assert acc.interval == (6.76, 93.24) and acc.to_dict()["interval95"] == [6.76, 93.24]
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)
