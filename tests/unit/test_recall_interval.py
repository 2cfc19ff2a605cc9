"""The recall check's 95% interval and verdict (segments/switch/recall.py), as pure logic."""
import pytest

from segments.switch import recall

K = 10


def interval_of(recalls):
    found = round(sum(r * K for r in recalls))
    return recall.interval(recalls, found, K * len(recalls))


def test_the_interval_narrows_with_more_queries():
    pattern = [1.0, 0.9, 1.0, 0.8, 1.0, 1.0, 0.9, 1.0]  # queries of differing difficulty
    widths = []
    for repeats in (1, 4, 16, 64):
        low, high = interval_of(pattern * repeats)
        assert low <= sum(pattern) / len(pattern) <= high
        widths.append(high - low)

    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4


def test_equal_recalls_still_leave_an_interval():
    # Five queries at recall 1.0 (sd 0) do not prove recall 1.0: the pooled Wilson bound remains.
    low, high = interval_of([1.0] * 5)

    assert high == 1.0 and low == pytest.approx(50 / (50 + 1.959964**2))  # Wilson's bound for 50 of 50
    assert low < 0.95  # not enough to pass a 0.95 threshold


def test_a_single_query_says_nothing_about_the_spread():
    assert interval_of([1.0]) == (0.0, 1.0)
    assert interval_of([]) == (0.0, 1.0)


def test_the_interval_stays_within_zero_and_one():
    low, high = interval_of([0.0, 1.0, 0.0, 1.0])

    assert 0.0 <= low < high <= 1.0


@pytest.mark.parametrize("mean, low, verdict", [
    (0.99, 0.96, "pass"),  # the whole interval at or above 0.95
    (0.97, 0.93, "inconclusive"),  # above on average, not proven
    (0.94, 0.90, "fail"),  # below on average
    (None, 0.0, "fail"),  # nothing measured
])
def test_the_verdict_against_the_minimum(mean, low, verdict):
    assert recall.verdict(mean, low, 0.95) == verdict


def test_the_budget_stops_taking_queries():
    ticks = iter(range(100))  # a clock that advances one second per reading

    sample = recall.measure([(1, "", None, None)] * 10, column="embedding", k=K, ef_search=40, seconds=0.5,
                            query_seconds=1, clock=lambda: next(ticks))

    assert sample.budget_spent and sample.recalls == [] and sample.timed_out == []
