"""`--check-derived`: does a table of derived vectors search like a real one of the same size?

With the B real vectors a derived run embedded (derived.py), four tables of B rows each get the
same HNSW index (vector, the live parameters) and the same real queries: the B real vectors,
B vectors derived from the first B/4 of them, B derived from the first B/16, and B random unit
vectors (HNSW's hardest case, to show the scale of a difference). Each gets its recall@10
against ef_search curve; the figure that matters is each derived curve's largest distance from
the real one.
"""
import numpy as np

from benchmark import derived, search_tables, truth
from benchmark.search_queries import K, literal, sweep


def _sets(real, seed):
    """{name: (description, vectors)} of the tables compared."""
    count = len(real)
    sets = {"real": (f"{count:,} real vectors", real)}
    for fraction in derived.CHECK_FRACTIONS:
        base = count // fraction
        if base >= derived.MIN_BASE:
            sets[f"derived_from_{base}"] = (f"{count:,} vectors derived from {base:,} real ones ({fraction}x)",
                                            derived.derive(real[:base], count, seed))
    noise = np.random.default_rng(seed + 3).standard_normal(real.shape, dtype=np.float32)
    sets["random"] = (f"{count:,} random unit vectors", derived.normalise(noise))
    return sets


def _curve(ctx, cursor, name, vectors, queries):
    """The ef_search sweep of one table of `vectors` (vector type), with the queries' exact answers."""
    table = ctx.scratch.table(f"check_{name}")
    ids = np.arange(1, len(vectors) + 1)
    search_tables.create(cursor, table, "vector", vectors.shape[1])
    search_tables.load(cursor, table, "vector", ids, np.zeros(len(ids), dtype=np.int32), vectors)
    settings = search_tables.build_settings(cursor, table, len(ids), "vector", ctx.options.index_memory,
                                            ctx.options.index_workers)
    search_tables.build_index(cursor, table, "vector", settings)
    exact = truth.top_k(vectors, ids, queries, K)
    entries = sweep(ctx, cursor, table, "vector", [literal(query) for query in queries], exact)
    cursor.execute(f"DROP TABLE {table}")
    return entries, float(np.mean([answer[-1][1] for answer in exact]))


def run(ctx, cursor, real, queries):
    """The check's figures: each table's curve, and each curve's largest distance from the real one."""
    results = {}
    for name, (description, vectors) in _sets(real, ctx.options.seed).items():
        ctx.progress(f"search: checking derived vectors: {description}")
        entries, distance = _curve(ctx, cursor, name, vectors, queries)
        results[name] = {"description": description, "sweep": entries, "mean_distance_at_10": distance}
    real_recall = [entry["recall_at_10"] for entry in results["real"]["sweep"]]
    return {
        "real_vectors": len(real),
        "queries": len(queries),
        "method": derived.method(),
        "sets": results,
        "largest_recall_difference": {
            name: max(abs(entry["recall_at_10"] - value) for entry, value in zip(figures["sweep"], real_recall))
            for name, figures in results.items() if name != "real"},
    }
