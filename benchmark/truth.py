"""Exact nearest neighbours by matrix products: the answers the search suite measures recall against.

At a million rows, one exact query in SQL is a sequential scan of the whole table (~1 s here),
so the ground truth is computed in numpy from the very vectors the suite loaded: cosine
distance, as pgvector's `<=>` computes it, over blocks of rows, keeping each query's K best.
For a halfvec column, pass the float16-rounded rows and queries (search_tables.stored): that is
what the column holds and what the server compares.
"""
import numpy as np

BLOCK = 65_536


def _unit(vectors):
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def top_k(rows, ids, queries, k, block=BLOCK):
    """Per query, [(id, cosine distance)] of its `k` nearest rows, nearest first."""
    queries = _unit(queries)
    count = len(rows)
    k = min(k, count)
    best_distance = np.full((len(queries), 0), np.inf, dtype=np.float32)
    best_index = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, count, block):
        distance = 1.0 - queries @ _unit(rows[start:start + block]).T
        take = min(k, distance.shape[1])
        part = np.argpartition(distance, take - 1, axis=1)[:, :take]
        best_distance = np.concatenate([best_distance, np.take_along_axis(distance, part, axis=1)], axis=1)
        best_index = np.concatenate([best_index, part + start], axis=1)
        keep = np.argsort(best_distance, axis=1, kind="stable")[:, :k]
        best_distance = np.take_along_axis(best_distance, keep, axis=1)
        best_index = np.take_along_axis(best_index, keep, axis=1)
    ids = np.asarray(ids)
    return [[(int(ids[j]), float(d)) for j, d in zip(row_index, row_distance)]
            for row_index, row_distance in zip(best_index, best_distance)]


def filtered_top_k(rows, ids, videos, video, queries, k):
    """top_k among the rows whose video is `video` (the exact answer of a filtered search)."""
    mask = np.asarray(videos) == video
    return top_k(rows[mask], np.asarray(ids)[mask], queries, k)
