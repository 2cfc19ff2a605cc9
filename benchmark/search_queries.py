"""Timing the search suite's queries and scoring them against the exact answer.

Latency is the SQL alone (the vector given as a parameter), after one untimed pass over the
queries; the figures "with encoding" add embedding the query text with the model, with torch's
configured thread count and with one thread (on a busy machine, one query's many small operations
can wait for a second thread far longer than they compute). Recall counts a returned row as found
when its distance is within the exact 10th distance (ties among identical vectors do not count as
misses).
"""
import contextlib
import time

import numpy as np
from django.db import transaction

from benchmark.measure import percentile_ms

K = 10
RECALL_TARGET = 0.95
TRUTH_SLACK = 1e-5  # numpy's float32 sums against pgvector's
# On a small table the planner prefers a sequential scan; the sweep measures the index.
INDEX_ONLY = "SET LOCAL enable_seqscan = off"


def literal(vector):
    return "[" + ",".join(f"{value:.9g}" for value in vector.tolist()) + "]"


def _top_k_sql(table, type_name="vector"):
    return (f"SELECT id, embedding <=> %s::{type_name} FROM {table} "
            f"ORDER BY embedding <=> %s::{type_name} LIMIT {K}")


def run_queries(cursor, table, literals, settings_sql, type_name="vector"):
    """(per-query seconds, per-query [(id, distance)]) with `settings_sql` SET LOCAL first."""
    sql, durations, results = _top_k_sql(table, type_name), [], []
    with transaction.atomic(using=cursor.db.alias):
        for statement in settings_sql:
            cursor.execute(statement)
        for query in literals:
            started = time.perf_counter()
            cursor.execute(sql, [query, query])
            rows = cursor.fetchall()
            durations.append(time.perf_counter() - started)
            results.append(rows)
    return durations, results


def recall(found, exact, slack=1e-6):
    """Mean share of each query's exact top K found; a row at the Kth exact distance counts."""
    shares = []
    for rows, expected in zip(found, exact):
        threshold = expected[-1][1] + slack
        shares.append(min(len(expected), sum(1 for _, distance in rows if distance <= threshold)) / len(expected))
    return float(np.mean(shares))


def index_used(cursor, table, query, type_name="vector"):
    """True when the sweep's plan is an HNSW index scan (the distance matches the opclass)."""
    with transaction.atomic(using=cursor.db.alias):
        cursor.execute(INDEX_ONLY)
        cursor.execute(f"EXPLAIN {_top_k_sql(table, type_name)}", [query, query])
        return any("Index Scan" in line for (line,) in cursor.fetchall())


def sweep(ctx, cursor, table, type_name, literals, exact, extra=None):
    """Per ef_search: p50/p95 and recall@10 against `exact`, plus `extra(found)`'s figures if given."""
    ef_values = ctx.options.ef_search
    run_queries(cursor, table, literals, [INDEX_ONLY, f"SET LOCAL hnsw.ef_search = {int(max(ef_values))}"],
                type_name)  # untimed: the index's pages into the caches
    results = []
    for ef in ef_values:
        ctx.progress(f"search: {type_name}, ef_search {ef}")
        durations, found = run_queries(cursor, table, literals,
                                       [INDEX_ONLY, f"SET LOCAL hnsw.ef_search = {int(ef)}"], type_name)
        entry = {"ef_search": ef, "p50_ms": percentile_ms(durations, 50), "p95_ms": percentile_ms(durations, 95),
                 "recall_at_10": recall(found, exact, TRUTH_SLACK)}
        results.append({**entry, **(extra(found) if extra else {})})
    return results


def rescored(found, ids, vectors, queries):
    """`found` with each row's cosine distance recomputed from `vectors` (rows in order of the sorted
    `ids`) and `queries`: a result scored as another type of column would score it."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scored = []
    for rows, query in zip(found, queries):
        row_ids = np.array([row_id for row_id, _ in rows], dtype=np.int64)
        values = vectors[np.searchsorted(ids, row_ids)]
        distance = 1.0 - values @ query / np.linalg.norm(values, axis=1)
        scored.append(list(zip(row_ids.tolist(), distance.tolist())))
    return scored


def chosen(results, target=RECALL_TARGET):
    """The smallest ef_search reaching the recall target, else the one with the best recall."""
    reaching = [entry for entry in results if entry["recall_at_10"] >= target]
    if reaching:
        return min(reaching, key=lambda entry: entry["ef_search"]), True
    return max(results, key=lambda entry: (entry["recall_at_10"], -entry["ef_search"])), False


@contextlib.contextmanager
def torch_threads(count):
    """Run the block with torch using `count` threads (None: as configured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def with_encoding(ctx, cursor, table, texts, ef, threads=None, type_name="vector"):
    """Per-query seconds of embedding the query text with the model plus the SQL, at `ef`."""
    with torch_threads(threads):
        return _with_encoding(ctx, cursor, table, texts, ef, type_name)


def _with_encoding(ctx, cursor, table, texts, ef, type_name):
    sql, durations = _top_k_sql(table, type_name), []
    ctx.service.encode_queries(texts[:1])  # warm-up
    with transaction.atomic(using=cursor.db.alias):
        cursor.execute(INDEX_ONLY)
        cursor.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
        for text in texts:
            started = time.perf_counter()
            query = literal(ctx.service.encode_query(text))
            cursor.execute(sql, [query, query])
            cursor.fetchall()
            durations.append(time.perf_counter() - started)
    return durations


def torch_thread_count():
    import torch

    return torch.get_num_threads()
