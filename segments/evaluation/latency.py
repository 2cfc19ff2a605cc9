"""Latency against accuracy, for each side: how long a question takes to embed (one at a time, as the
live search embeds it), and how long the search takes through the column's real index at several
`ef_search` values, each with the index's own recall@10 against the exact search of the same query
(the rows tied with the exact 10th counting as found, as verify_embeddings counts them). Plotted, the
points are the curve an operator picks `HNSW_EF_SEARCH` on.

A column without a valid HNSW index has no curve: every search scans the table (its exact search's
timing is given). Search times are the server's (segments.evaluation.searching): the network between
this machine and the database is not in them, so an evaluation run far from the database reports what
the application next to it would see.
"""
import time

from segments.evaluation import stats
from segments.evaluation.searching import mean_pace, search_all
from segments.search import cosine_index

DEFAULT_EF_SEARCH = (20, 40, 100, 200)


def embedding(encoder, texts):
    """Timings of embedding each of `texts` as a question, one call each (after one to warm up)."""
    if encoder is None or not texts:
        return None
    encoder.encode_query(texts[0])
    spent = []
    for text in texts:
        started = time.perf_counter()
        encoder.encode_query(text)
        spent.append(time.perf_counter() - started)
    return stats.timings(spent, (50, 95))


def curve(cursor, budget, vectors, column, ef_values, using="default"):
    """{"index", "exact", "points": [{"ef_search", "recall_at_10", "p50_ms", "p95_ms", "p99_ms"}]} of
    `column` (a table.Column) with `vectors` as the questions."""
    index = cosine_index(column.name, using)
    found = search_all(cursor, budget, vectors, column, exact=True, using=using)
    exact = [(vector, item[0]) for vector, item in zip(vectors, found) if item is not None]
    spent = [item[1] for item in found if item is not None]
    shown = {"index": index[0] if index and index[1] else None, "exact": stats.timings(spent), "points": []}
    if shown["index"] is None:
        return shown
    for ef in sorted(set(ef_values)):
        shown["points"].append(_point(cursor, budget, exact, column, ef, mean_pace(found), using))
    return shown


def _point(cursor, budget, exact, column, ef, pace, using):
    found = search_all(cursor, budget, [vector for vector, _ in exact], column, pace, ef_search=ef, using=using)
    kept = [(truth, item) for (_, truth), item in zip(exact, found) if item is not None]
    recalls = [_recall(truth, item[0]) for truth, item in kept]
    spent = [item[1] for _, item in kept]
    mean = sum(recalls) / len(recalls) if recalls else None
    return {"ef_search": ef, "recall_at_10": mean, **stats.timings(spent)}


def _recall(truth, hits):
    """The share of the exact top 10 the index found (rows tied with the exact 10th counting as found)."""
    if not truth:
        return 1.0
    worst = truth[-1][4] + 1e-6
    found = sum(1 for hit in hits if hit[4] <= worst)
    return min(found, len(truth)) / len(truth)
