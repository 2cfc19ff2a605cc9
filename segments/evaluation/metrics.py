"""Figures from ranks: for each query, the rank (1-based) of the first result that answers it, or None
when none of the top K does.

- recall@1 and recall@10: the share of queries answered first, or in the top 10 (Wilson intervals);
- MRR@10: the mean of 1/rank over the queries (0 when not in the top 10; Student's t interval);
- the change in recall@10 from the old side to the new on the same queries, with its paired interval,
  overall and per slice (video type, speaker, text length);
- the agreement of two rankings: the share of the top 10 both hold, and the rank-biased overlap.
"""
from segments.compare import rbo
from segments.evaluation import stats

K = 10


def rank_of(hits, answers, window):
    """The rank of the first of `hits` [(id, video_id, start_sec, end_sec)] that answers, or None."""
    return next((rank for rank, hit in enumerate(hits[:K], 1) if answers.answered_by(hit, window)), None)


def _share(hits):
    low, high = stats.wilson(sum(hits), len(hits))
    return {"value": sum(hits) / len(hits) if hits else None, "low": low, "high": high}


def side(ranks):
    """{"n", "recall_at_1", "recall_at_10", "mrr_at_10"}, each {"value", "low", "high"}."""
    mrr, low, high = stats.mean_interval([1 / rank if rank else 0.0 for rank in ranks])
    return {"n": len(ranks), "recall_at_1": _share([rank == 1 for rank in ranks]),
            "recall_at_10": _share([rank is not None for rank in ranks]),
            "mrr_at_10": {"value": mrr, "low": low, "high": high}}


def change(old_ranks, new_ranks):
    """The paired change in recall@10 (stats.paired_change)."""
    return stats.paired_change([rank is not None for rank in old_ranks], [rank is not None for rank in new_ranks])


def judged(queries, old_ranks, new_ranks):
    """{"old", "new", "change", "slices"} for queries both sides answered (or failed to)."""
    return {"old": side(old_ranks), "new": side(new_ranks), "change": change(old_ranks, new_ranks),
            "slices": slices(queries, old_ranks, new_ranks)}


def slices(queries, old_ranks, new_ranks):
    """[{"slice", "value", "n", "old", "new", "change"}] for each value of each slice, largest first: each side's
    figures (`side`) and the change in recall@10."""
    groups = {}
    for query, old, new in zip(queries, old_ranks, new_ranks):
        for name, value in query.slices.items():
            groups.setdefault((name, value), ([], []))
            groups[(name, value)][0].append(old)
            groups[(name, value)][1].append(new)
    found = [{"slice": name, "value": value, "n": len(olds), "old": side(olds), "new": side(news),
              "change": change(olds, news)} for (name, value), (olds, news) in groups.items()]
    return sorted(found, key=lambda entry: (entry["slice"], -entry["n"], str(entry["value"])))


def agreement(old_lists, new_lists):
    """{"n", "overlap_at_10", "rbo"}: the mean share of the top 10 both rankings hold, and the mean RBO."""
    pairs = [(old[:K], new[:K]) for old, new in zip(old_lists, new_lists) if old or new]
    if not pairs:
        return {"n": 0, "overlap_at_10": None, "rbo": None}
    overlaps = [len(set(old) & set(new)) / K for old, new in pairs]
    rbos = [rbo(old, new) for old, new in pairs]
    return {"n": len(pairs), "overlap_at_10": sum(overlaps) / len(pairs),
            "rbo": sum(value for value in rbos if value is not None) / len(pairs)}
