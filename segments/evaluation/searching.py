"""The searches the evaluation runs: each column's own cosine search, through its index when it has
one, as the application's search runs it (`hnsw.ef_search`, iterative scans where pgvector has
them), timed, and the same query exact (index scans off) to measure the index against.

The judged searches are kept to the segments that have both vectors, so that on a partial backfill
the old side does not find segments the new side cannot hold yet.

Far from the database (an operator's GPU at home, the managed database abroad), a round trip costs
20-150 ms, more than a search. So the questions of one configuration (column, ef_search, exact or
not) go in batches of one message, one round trip, whatever a batch holds: `SAVEPOINT`, the
configuration's `set_config(..., true)`, and one SELECT that searches them all, `unnest(...) WITH
ORDINALITY` joined LATERAL to the search, which is planned as the single search is (through the HNSW
index; a scan when index scans are off). Nothing outlives the transaction (no session setting,
nothing in pg_temp), as a pooler in transaction mode needs; the savepoints end with it.

Each question's time is measured on the server, so the network is not in it (nor the planning, once
a batch): `clock_timestamp()` when its row comes out of `unnest` (a subquery with a volatile output
is never flattened, and the nested loop takes the next question only after this one's last hit),
and again on each of its hits; its time is that of its last hit (`per_question`). A question with no
hit still has one row (LEFT JOIN), so its time is kept. In a batch an exact search computes its
distances in one process (the question is the nested loop's parameter): on a large table without an
index its time is that of a serial scan, where the single statement may share it among workers.

A configuration's first batch is one question, to learn the pace, unless a slower search of the same
questions told it; the next are sized to about BATCH_SECONDS of searching and a quarter of the
statement timeout at most, so that a slow exact search on a large table does not take many others
with it. A batch the statement timeout stops is rolled back to its savepoint and counted (each of
its questions), and the configuration goes on one question at a time. The budget is checked between
batches: what is left when it is spent is counted as skipped.
"""
import math
import time
from dataclasses import dataclass, field

from django.db import OperationalError

from askdrchaffee import postgres
from segments.search import MAX_K, has_iterative_scan

K = 10
MAX_BATCH = 200  # questions in one statement at most
BATCH_SECONDS = 2.0  # the searching a batch is sized to, from the pace of the batches before it
SAVEPOINT = "evaluation_batch"  # each batch's, opened in its message, released with the transaction


@dataclass
class Budget:
    """The evaluation's time for searching, and what it could not do within it."""

    seconds: float
    statement_timeout: float = 30.0  # each batch is sized to a quarter of it at most
    started: float = field(default_factory=time.monotonic)
    timed_out: int = 0  # searches stopped by the statement timeout
    skipped: int = 0  # searches not run: the budget was spent

    @property
    def spent(self):
        return time.monotonic() - self.started >= self.seconds

    def as_dict(self):
        return {"seconds": self.seconds, "spent": self.spent, "timed_out": self.timed_out, "skipped": self.skipped}


def literal(vector):
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


def array_literal(vectors):
    """One text literal of a vector array (`'{"[1,2]","[3,4]"}'`): one parameter however many vectors."""
    return "{" + ",".join(f'"{literal(vector)}"' for vector in vectors) + "}"


def settings_for(ef_search, exact, k, using="default"):
    """The settings of one configuration's searches, as the application's search sets them."""
    values = {"hnsw.ef_search": min(max(ef_search, k), MAX_K), "enable_indexscan": "off" if exact else "on"}
    if has_iterative_scan(using):
        values["hnsw.iterative_scan"] = "relaxed_order"
    return values


def search_sql(column, within=None):
    """The batch's SELECT, with two parameters (the vectors' array literal, k): rows (question number,
    seconds since the question's own row came out, id, video_id, start_sec, end_sec, distance)."""
    also = f" AND s.{within.name} IS NOT NULL" if within is not None else ""
    return (f"SELECT q.n, extract(epoch FROM clock_timestamp() - q.asked)::float8, h.* "
            f"FROM (SELECT u.v, u.n, clock_timestamp() AS asked "
            f"FROM unnest(%s::{column.type_name}[]) WITH ORDINALITY u(v, n)) q "
            f"LEFT JOIN LATERAL (SELECT s.id, s.video_id, s.start_sec, s.end_sec, s.{column.name} <=> q.v AS d "
            f"FROM segments s WHERE s.{column.name} IS NOT NULL{also} ORDER BY d LIMIT %s) h ON true")


def search_batch(cursor, vectors, column, *, within=None, ef_search=100, exact=False, k=K, using="default"):
    """[(hits [(id, video_id, start_sec, end_sec, distance)], seconds)] of the `k` segments nearest to each of
    `vectors` in `column` (a table.Column), among those with a vector in `within` too when given: one message in
    the caller's transaction, its savepoint (SAVEPOINT) first."""
    values = settings_for(ef_search, exact, k, using)
    configure = ", ".join("set_config(%s, %s, true)" for _ in values)
    params = [item for name, value in values.items() for item in (name, str(value))]
    cursor.execute(f"SAVEPOINT {SAVEPOINT}; SELECT {configure}; {search_sql(column, within)}",
                   params + [array_literal(vectors), k])
    return per_question(cursor.fetchall(), len(vectors))


def per_question(rows, count):
    """[(hits nearest first, seconds)] of questions 1..`count` from the batch's rows (search_sql): a question's
    time is its last row's; a question without hits has one row without a segment."""
    hits, seconds = [[] for _ in range(count)], [0.0] * count
    for n, spent, *hit in rows:
        seconds[n - 1] = max(seconds[n - 1], spent)
        if hit[0] is not None:
            hits[n - 1].append(tuple(hit))
    for found in hits:
        found.sort(key=lambda hit: hit[4])  # relaxed_order iterative scans may be slightly out of order
    return list(zip(hits, seconds))


def batch_size(pace, statement_timeout):
    """Questions in the next batch at `pace` seconds a question so far (None: not known yet, one question;
    math.inf after a timeout: one at a time)."""
    if pace is None:
        return 1
    target = min(BATCH_SECONDS, statement_timeout / 4)
    return max(1, min(MAX_BATCH, int(target / pace) if pace > 0 else MAX_BATCH))


def search_all(cursor, budget, vectors, column, pace=None, **options):
    """[(hits, seconds) or None] of each of `vectors` (search_batch's options): in batches (module docstring),
    None for a search the statement timeout stopped or the spent budget skipped. `pace`: seconds a question,
    when a slower search of the same questions told it (the exact search, for the index's)."""
    found, spent = [], 0.0
    while len(found) < len(vectors):
        if budget.spent:
            budget.skipped += len(vectors) - len(found)
            return found + [None] * (len(vectors) - len(found))
        batch = vectors[len(found): len(found) + batch_size(pace, budget.statement_timeout)]
        done = _unless_timed_out(cursor, lambda: search_batch(cursor, batch, column, **options))
        if done is None:  # one question at a time from now on
            budget.timed_out += len(batch)
            found, pace = found + [None] * len(batch), math.inf
        else:
            found += done
            spent += sum(seconds for _, seconds in done)
            pace = math.inf if pace == math.inf else spent / len(found)
    return found


def mean_pace(found):
    """Seconds a question of search_all's result, None when none ran."""
    spent = [item[1] for item in found if item is not None]
    return sum(spent) / len(spent) if spent else None


def _unless_timed_out(cursor, run):
    """`run()`; None when the statement timeout stopped it, its savepoint rolled back to."""
    try:
        return run()
    except OperationalError as exc:
        if postgres.pgcode(exc) != postgres.QUERY_CANCELED:
            raise
        cursor.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        return None


def judged_hits(cursor, budget, vectors, column, other, ef_search, using="default"):
    """[hits or None] of each query vector in `column`, among segments with both vectors."""
    found = search_all(cursor, budget, vectors, column, within=other, ef_search=ef_search, using=using)
    return [None if item is None else item[0] for item in found]
