"""Recall@k of the HNSW search against exact search: bounded in time, with a 95% confidence interval.

The recall check of `manage.py verify_embeddings` (segments/switch/verify.py). Each sampled row's
own vector is a query; its recall is the share of the exact top k (the same query with index scans
off) that the HNSW search returns, rows tied with the exact k-th counting as found.

Bounded. On a large table every exact search is a sequential scan (about a second per million
rows), so `measure()` runs each query (its exact and its HNSW search) under `SET LOCAL
statement_timeout` = the smaller of `query_seconds` and what is left of the check's budget
`seconds`, and stops taking queries once the budget is spent. It reports how many queries it
used, whether the budget ran out, and every query that timed out (by segment id): a timed-out
query has no recall and is left out of the figures, said so, never silently dropped.

The interval. From the n per-query recalls, the 95% interval is the union of
  (a) Student's t interval of their mean, mean ± t(0.975, n - 1) · sd / √n, which allows for queries
      differing in difficulty, and
  (b) the Wilson score interval of the pooled neighbours (found / asked for, over all queries),
      which keeps the interval from collapsing to a point when every query has the same recall:
      5 queries at recall 1.0 do not prove a recall of 1.0 (their interval is 0.929..1),
clipped to [0, 1]. With a single query nothing is known about how queries vary: the interval is
[0, 1].

The verdict against MIN_RECALL:
  pass          the interval's lower bound is at least MIN_RECALL (accurate, with 95% confidence);
  fail          the mean recall is below MIN_RECALL (so the upper bound too, when it is below, says
                the index is inaccurate with 95% confidence), or no query finished in time;
  inconclusive  the mean is at least MIN_RECALL but the lower bound is not: reported, not judged
                (the check is shown as INFO and does not fail the run); more queries (--sample,
                --recall-seconds) narrow the interval.
"""
import math
import time
from dataclasses import dataclass, field

from django.db import OperationalError, connections, transaction

from segments.search import nearest

QUERY_CANCELED = "57014"
METHOD = "union of Student's t over per-query recalls and Wilson over pooled neighbours"


def wilson(found, asked):
    """The 95% Wilson score interval of a proportion `found` / `asked`."""
    from scipy.stats import binomtest

    if asked == 0:
        return 0.0, 1.0
    ci = binomtest(found, asked).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def interval(recalls, found, asked):
    """The 95% interval of the mean recall (module docstring): `recalls` per query, `found` and
    `asked` the neighbours pooled over them."""
    n = len(recalls)
    if n < 2:
        return 0.0, 1.0
    mean = sum(recalls) / n
    sd = math.sqrt(sum((r - mean) ** 2 for r in recalls) / (n - 1))
    from scipy.stats import t

    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    low, high = wilson(found, asked)
    return max(0.0, min(mean - half, low)), min(1.0, max(mean + half, high))


def verdict(mean, low, minimum):
    """"pass", "fail" or "inconclusive" (module docstring); "fail" when nothing was measured."""
    if mean is None or mean < minimum:
        return "fail"
    return "pass" if low >= minimum else "inconclusive"


@dataclass
class RecallSample:
    k: int
    ef_search: int
    seconds_budget: float
    query_seconds: float
    sampled: int  # rows offered as queries
    recalls: list = field(default_factory=list)  # per measured query
    found: int = 0  # neighbours found, pooled
    asked: int = 0  # neighbours asked for (the exact top k's size), pooled
    timed_out: list = field(default_factory=list)  # segment ids whose query hit statement_timeout
    budget_spent: bool = False
    seconds: float = 0.0

    @property
    def mean(self):
        return sum(self.recalls) / len(self.recalls) if self.recalls else None

    @property
    def interval(self):
        return interval(self.recalls, self.found, self.asked)


def measure(rows, *, column, k, ef_search, seconds, query_seconds, using="default", clock=time.monotonic):
    """Recall of each of `rows` ((id, _, vector, _) as verify samples them) until the budget of
    `seconds` is spent; each query under statement_timeout (module docstring)."""
    sample = RecallSample(k, ef_search, seconds, query_seconds, len(rows))
    started = clock()
    for pk, _, vector, _ in rows:
        left = seconds - (clock() - started)
        if left <= 0:
            sample.budget_spent = True
            break
        try:
            exact, approximate = _pair(vector, column, k, ef_search, min(query_seconds, left), using)
        except OperationalError as exc:
            if getattr(exc.__cause__, "pgcode", None) != QUERY_CANCELED:
                raise
            sample.timed_out.append(pk)
            continue
        if exact:
            worst = exact[-1].distance + 1e-6  # rows tied with the exact k-th count as found
            found = min(sum(row.distance <= worst for row in approximate), len(exact))
            sample.recalls.append(found / len(exact))
            sample.found, sample.asked = sample.found + found, sample.asked + len(exact)
    sample.seconds = clock() - started
    return sample


def _pair(vector, column, k, ef_search, timeout, using):
    """(exact top k, HNSW top k) of `vector`, in one transaction under statement_timeout =
    `timeout` seconds (a savepoint inside a caller's transaction: its value is put back after)."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SELECT current_setting('statement_timeout'), set_config('statement_timeout', %s, true)",
                       [f"{max(1, math.ceil(timeout * 1000))}ms"])
        previous = cursor.fetchone()[0]
        exact = nearest(vector, k=k, column=column, exact=True, using=using)
        approximate = nearest(vector, k=k, column=column, ef_search=ef_search, using=using)
        cursor.execute("SELECT set_config('statement_timeout', %s, true)", [previous])
    return exact, approximate
