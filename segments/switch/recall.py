"""Recall@k of the HNSW search against exact search: bounded in time, with a 95% confidence interval.

The recall check of `manage.py verify_embeddings` (segments/switch/verify.py). Each sampled row's
own vector is a query; its recall is the share of the exact top k (the same query with index scans
off) that the HNSW search returns, rows tied with the exact k-th counting as found.

Bounded. On a large table every exact search is a sequential scan (about a second per million
rows), so `measure()` runs its queries (each one's exact and HNSW search) CHUNK at a time, each
chunk one statement in one message (one round trip, far from the database, for CHUNK queries),
under `statement_timeout` = `query_seconds` a query, at most what is left of the check's budget
`seconds`, and stops taking queries once the budget is spent. It reports how many queries it
used, whether the budget ran out, and every query that timed out (by segment id: all of a chunk
that timed out): a timed-out query has no recall and is left out of the figures, said so, never
silently dropped. The exact search is the same ORDER BY with its distance made an expression the
index cannot serve (`+ 0`), so both run in one statement.

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


CHUNK = 10  # queries a round trip


def measure(rows, *, column, k, ef_search, seconds, query_seconds, using="default", clock=time.monotonic):
    """Recall of each of `rows` ((id, _, vector, _) as verify samples them) until the budget of
    `seconds` is spent; CHUNK queries a statement, each under statement_timeout (module docstring)."""
    sample = RecallSample(k, ef_search, seconds, query_seconds, len(rows))
    started = clock()
    ids = [pk for pk, *_ in rows]
    for first in range(0, len(ids), CHUNK):
        chunk = ids[first:first + CHUNK]
        left = seconds - (clock() - started)
        if left <= 0:
            sample.budget_spent = True
            break
        try:
            found = _chunk(chunk, column, k, ef_search, min(query_seconds * len(chunk), left), using)
        except OperationalError as exc:
            if getattr(exc.__cause__, "pgcode", None) != QUERY_CANCELED:
                raise
            sample.timed_out.extend(chunk)
            continue
        for exact, approximate in found:
            _count(sample, exact, approximate)
    sample.seconds = clock() - started
    return sample


def _count(sample, exact, approximate):
    """Add one query's recall: the share of its exact top k its HNSW top k found (ties with the k-th count)."""
    exact = [distance for distance in exact if distance is not None]
    if exact:
        worst = exact[-1] + 1e-6  # rows tied with the exact k-th count as found
        found = min(sum(distance is not None and distance <= worst for distance in approximate), len(exact))
        sample.recalls.append(found / len(exact))
        sample.found, sample.asked = sample.found + found, sample.asked + len(exact)


def _chunk(ids, column, k, ef_search, timeout, using):
    """[(exact top-k distances, HNSW top-k distances)] of the rows `ids`' own vectors, in one message under
    statement_timeout = `timeout` seconds (in a caller's transaction: a savepoint, its settings put back)."""
    settings_sql = ("SELECT set_config('statement_timeout', %(timeout)s, true), "
                    "set_config('hnsw.ef_search', %(ef_search)s, true)")
    query = f"""
        SELECT ARRAY(SELECT (t.{column} <=> q.{column})::float8 FROM segments t WHERE t.{column} IS NOT NULL
                     ORDER BY (t.{column} <=> q.{column}) + 0 LIMIT %(k)s),
               ARRAY(SELECT (t.{column} <=> q.{column})::float8 FROM segments t
                     ORDER BY t.{column} <=> q.{column} LIMIT %(k)s)
        FROM segments q WHERE q.id = ANY(%(ids)s) AND q.{column} IS NOT NULL ORDER BY q.id
    """
    params = {"timeout": f"{max(1, math.ceil(timeout * 1000))}ms", "ef_search": str(max(ef_search, k)), "k": k,
              "ids": list(ids)}
    connection = connections[using]
    if not connection.in_atomic_block:  # one message: an implicit transaction, its settings gone with it
        with connection.cursor() as cursor:
            cursor.execute(f"{settings_sql}; {query}", params)
            return cursor.fetchall()
    with transaction.atomic(using=using), connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('statement_timeout'), current_setting('hnsw.ef_search', true)")
        before = cursor.fetchone()
        cursor.execute(settings_sql, params)
        cursor.execute(query, params)
        found = cursor.fetchall()
        cursor.execute("SELECT set_config('statement_timeout', %s, true), set_config('hnsw.ef_search', %s, true)",
                       [before[0], before[1] or "40"])
        return found
