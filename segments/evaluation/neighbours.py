"""Judging a column from its stored vectors alone, for when its model cannot run here (the original
GTE-Qwen2-1.5B needs a large GPU): a segment's nearest neighbours should include the same moment of
the same video (a segment within `window` seconds of it), because a talk stays on its subject.

For sampled segments that have such a partner, each column's 10 nearest neighbours (itself left out)
are found by exact cosine search within a pool of whole videos (pool_ids), and the rank of the first
from the same moment is kept: the judged figure is the share of segments with one in the top 10, the
same for both columns, so their change has a paired interval. The share of the 10 from the same
video is given too. Vectors that carry no meaning (random, or collapsed) find the same moment only by
chance.
"""
import random

import numpy as np

from segments.evaluation import metrics
from segments.evaluation.queries import Answers, Query, slices_of

K = metrics.K


def unit(matrix):
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def eligible(rows, ids, window):
    """The pool's ids that have another segment of the same moment in the pool."""
    by_video = {}
    for pk in ids:
        by_video.setdefault(rows[pk].video_id, []).append(rows[pk])
    return [pk for pk in ids if any(other.id != pk and _moment(rows[pk]).answered_by(_hit(other), window)
                                    for other in by_video[rows[pk].video_id])]


def _moment(row):
    """The answer "the same moment as `row`" (not `row` itself)."""
    return Answers(frozenset(), ((row.video_id, row.start_sec, row.end_sec),))


def choose(candidates, size, seed):
    chosen = sorted(candidates)
    random.Random(seed).shuffle(chosen)
    return sorted(chosen[:size])


def ranks(rows, ids, matrix, chosen, window):
    """(ranks of the first same-moment neighbour, shares of the top 10 from the same video, top-10 id lists)."""
    position = {pk: i for i, pk in enumerate(ids)}
    vectors = unit(matrix)
    found, same_video, lists = [], [], []
    for start in range(0, len(chosen), 256):
        block = chosen[start:start + 256]
        scores = vectors[[position[pk] for pk in block]] @ vectors.T
        for row_scores, pk in zip(scores, block):
            row_scores[position[pk]] = -np.inf  # itself
            nearest = np.argsort(-row_scores, kind="stable")[:K]
            hits = [_hit(rows[int(ids[i])]) for i in nearest if i != position[pk]]
            found.append(metrics.rank_of(hits, _moment(rows[pk]), window))
            same_video.append(sum(hit[1] == rows[pk].video_id for hit in hits) / K)
            lists.append([hit[0] for hit in hits])
    return found, same_video, lists


def _hit(row):
    return row.id, row.video_id, row.start_sec, row.end_sec


def judge(rows, ids, old_matrix, new_matrix, size, seed, window):
    """The stored-vector comparison of the two columns over the pool (module docstring)."""
    chosen = choose(eligible(rows, ids, window), size, seed)
    old_ranks, old_video, old_lists = ranks(rows, ids, old_matrix, chosen, window)
    new_ranks, new_video, new_lists = ranks(rows, ids, new_matrix, chosen, window)
    queries = [Query(rows[pk].text, "neighbours", None, slices_of(rows[pk])) for pk in chosen]
    figures = metrics.judged(queries, old_ranks, new_ranks)
    figures["pool"] = len(ids)
    figures["same_video_at_10"] = {"old": _mean(old_video), "new": _mean(new_video)}
    figures["agreement"] = metrics.agreement(old_lists, new_lists)
    return figures


def _mean(values):
    return sum(values) / len(values) if values else None
