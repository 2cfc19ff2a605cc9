"""The intervals the evaluation gives its figures, and the percentiles of its timings.

- A share of queries (recall@1, recall@10, the share of segments with a neighbour from the same
  moment): the 95% Wilson score interval, which stays inside [0, 1] and does not collapse to a point
  when every query succeeds.
- A mean of per-query values (MRR@10): Student's t interval of the mean, clipped to [0, 1]; [0, 1]
  with fewer than two queries.
- The change from the old side to the new on the same queries (new minus old, each query answered
  or not by each side): the paired interval of Agresti and Min ("Simple improved confidence
  intervals for comparing matched proportions", Statistics in Medicine 24(5), 2005): half a query
  added to each of the four cells of the 2x2 table, then Wald's interval. With every query agreeing,
  it still has a width of about 2/n, so a few dozen queries never prove that nothing changed.
"""
import math

Z95 = 1.959963984540054


def wilson(successes, n):
    """(low, high) of the 95% Wilson interval of `successes` out of `n`; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values):
    """(mean, low, high): the mean of `values` in [0, 1] with Student's t 95% interval, clipped."""
    n = len(values)
    if n == 0:
        return None, 0.0, 1.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0, 1.0
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def paired_change(old_hits, new_hits):
    """{"n", "old", "new", "change", "low", "high", "lost", "gained"} for paired 0/1 outcomes of the same
    queries: the change new - old with the Agresti-Min 95% interval (module docstring)."""
    n = len(old_hits)
    if n == 0:
        return {"n": 0, "old": None, "new": None, "change": None, "low": -1.0, "high": 1.0, "lost": 0, "gained": 0}
    lost = sum(1 for old, new in zip(old_hits, new_hits) if old and not new)
    gained = sum(1 for old, new in zip(old_hits, new_hits) if new and not old)
    b, c, m = lost + 0.5, gained + 0.5, n + 2
    centre = (c - b) / m
    half = Z95 * math.sqrt(max(0.0, (b + c) / m - ((c - b) / m) ** 2) / m)
    return {"n": n, "old": sum(map(bool, old_hits)) / n, "new": sum(map(bool, new_hits)) / n,
            "change": (gained - lost) / n, "low": max(-1.0, centre - half), "high": min(1.0, centre + half),
            "lost": lost, "gained": gained}


def percentile(values, q):
    """The `q`-th percentile (0-100) of `values`, interpolated; None when there are none."""
    values = sorted(values)
    if not values:
        return None
    position = (len(values) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(values) - 1)
    return values[below] + (values[above] - values[below]) * (position - below)


def timings(seconds, quantiles=(50, 95, 99)):
    """{"n", "p50_ms", "p95_ms", ...} of durations given in seconds."""
    shown = {"n": len(seconds)}
    for q in quantiles:
        value = percentile(seconds, q)
        shown[f"p{q}_ms"] = None if value is None else round(value * 1000, 2)
    return shown
