"""The searches the evaluation runs: each column's own cosine search, through its index when it has
one, as the application's search runs it (`SET LOCAL hnsw.ef_search`, iterative scans where pgvector
has them), timed, and the same query exact (index scans off) to measure the index against.

The judged searches are kept to the segments that have both vectors, so that on a partial backfill
the old side does not find segments the new side cannot hold yet. Each search runs in a savepoint
of the caller's read-only transaction: one that hits the statement timeout is counted as such, and
the evaluation goes on. The evaluation stops asking once its time budget is spent.
"""
import time
from dataclasses import dataclass, field

from django.db import OperationalError, transaction

from askdrchaffee import postgres
from segments.search import MAX_K, has_iterative_scan

K = 10


@dataclass
class Budget:
    """The evaluation's time for searching, and what it could not do within it."""

    seconds: float
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


def search(cursor, vector, column, *, within=None, ef_search=100, exact=False, k=K, using="default"):
    """(hits [(id, video_id, start_sec, end_sec, distance)], seconds) of the `k` segments nearest to `vector` in
    `column` (a table.Column), among those with a vector in `within` too when given."""
    values = {"hnsw__ef_search": min(max(ef_search, k), MAX_K), "enable_indexscan": "off" if exact else "on"}
    if has_iterative_scan(using):
        values["hnsw__iterative_scan"] = "relaxed_order"
    postgres.set_local(cursor, **values)
    also = f"AND s.{within.name} IS NOT NULL " if within is not None else ""
    started = time.perf_counter()
    cursor.execute(f"SELECT s.id, s.video_id, s.start_sec, s.end_sec, s.{column.name} <=> %s::{column.type_name} AS d "
                   f"FROM segments s WHERE s.{column.name} IS NOT NULL {also}ORDER BY d LIMIT %s",
                   [literal(vector), k])
    rows = cursor.fetchall()
    seconds = time.perf_counter() - started
    rows.sort(key=lambda row: row[4])  # relaxed_order iterative scans may be slightly out of order
    return rows, seconds


def bounded(cursor, budget, run):
    """`run()` in a savepoint, unless the budget is spent; None when it was skipped or timed out."""
    if budget.spent:
        budget.skipped += 1
        return None
    try:
        with transaction.atomic(using=cursor.db.alias):
            return run()
    except OperationalError as exc:
        if postgres.pgcode(exc) != postgres.QUERY_CANCELED:
            raise
        budget.timed_out += 1
        return None


def judged_hits(cursor, budget, vectors, column, other, ef_search, using="default"):
    """[hits or None] of each query vector in `column`, among segments with both vectors."""
    return [bounded(cursor, budget, lambda v=vector: search(cursor, v, column, within=other, ef_search=ef_search,
                                                           using=using)[0])
            for vector in vectors]
