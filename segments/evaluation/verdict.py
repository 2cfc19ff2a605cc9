"""The verdict: GO, NO-GO or INCONCLUSIVE, with its reasons.

NO-GO when any of these holds:
- the new column's vectors cannot serve a search (health.py: zero, collapsed, duplicated);
- recall@10 falls, on a judged set of queries (known-item, labelled, the logged questions the labelled
  file answers; in the stored-vector mode, the same-moment neighbours), by more than the tolerance, and
  the fall is real: its 95% paired interval lies below zero. The same for each slice (video type,
  speaker, text length) with at least `min_slice_queries` queries;
- the new side passes a latency limit (its search p95 at HNSW_EF_SEARCH, its question embedding p95).

GO when none holds and each judged set of at least `min_queries` queries shows, with 95% confidence,
a fall of no more than the tolerance (the lower end of its interval is above minus the tolerance), and
there is at least one such set.

INCONCLUSIVE otherwise: too few queries, or a change whose interval is too wide to say (more
queries narrow it).
"""
from dataclasses import dataclass

GO, NO_GO, INCONCLUSIVE = "GO", "NO-GO", "INCONCLUSIVE"
EXIT_STATUS = {GO: 0, NO_GO: 1, INCONCLUSIVE: 3}
COULD_NOT_RUN = 2


@dataclass(frozen=True)
class Rules:
    tolerance: float = 0.02
    min_queries: int = 30
    min_slice_queries: int = 50
    max_search_p95_ms: float | None = None
    max_embed_p95_ms: float | None = None


def _percent(value):
    return f"{value:+.3f}"


def _fell(name, change, rules):
    """A sentence when `change` (stats.paired_change) is a real fall beyond the tolerance, else None."""
    if change["n"] == 0 or change["change"] is None:
        return None
    if change["change"] < -rules.tolerance and change["high"] < 0:
        return (f"recall@10 fell from {change['old']:.3f} to {change['new']:.3f} ({_percent(change['change'])}, 95% "
                f"interval {change['low']:+.3f}..{change['high']:+.3f}) over {change['n']} {name}: more than the "
                f"tolerance {rules.tolerance}.")
    return None


def _regressions(judged, rules):
    reasons = []
    for name, figures in judged:
        if figures["change"]["n"] >= rules.min_queries:
            reasons.append(_fell(name, figures["change"], rules))
        for entry in figures["slices"]:
            if entry["n"] >= rules.min_slice_queries:
                where = f"{name} in the slice {entry['slice']} = {entry['value']}"
                reasons.append(_fell(where, entry["change"], rules))
    return [reason for reason in reasons if reason]


def _latency(latency, rules):
    reasons = []
    search, embed = (latency or {}).get("search_p95_ms"), (latency or {}).get("embed_p95_ms")
    if rules.max_search_p95_ms is not None and search is not None and search > rules.max_search_p95_ms:
        reasons.append(f"the new search's p95 is {search:.1f} ms at ef_search {latency['ef_search']}, over the limit "
                       f"of {rules.max_search_p95_ms:g} ms.")
    if rules.max_embed_p95_ms is not None and embed is not None and embed > rules.max_embed_p95_ms:
        reasons.append(f"the new model embeds a question in {embed:.1f} ms (p95), over the limit of "
                       f"{rules.max_embed_p95_ms:g} ms.")
    return reasons


def _unmeasured(latency, rules):
    missing = []
    if rules.max_search_p95_ms is not None and (latency or {}).get("search_p95_ms") is None:
        missing.append("the new search's latency limit could not be checked (no search was timed)")
    if rules.max_embed_p95_ms is not None and (latency or {}).get("embed_p95_ms") is None:
        missing.append("the question embedding limit could not be checked (the new model does not run here)")
    return missing


def decide(judged, health_problems, latency, rules):
    """{"verdict", "exit_status", "reasons"} from the judged sets [(name, metrics.judged figures)], the new
    column's health problems and its latency ({"search_p95_ms", "embed_p95_ms", "ef_search"})."""
    refusals = list(health_problems) + _regressions(judged, rules) + _latency(latency, rules)
    if refusals:
        return {"verdict": NO_GO, "exit_status": EXIT_STATUS[NO_GO], "reasons": refusals}
    enough = [(name, figures) for name, figures in judged if figures["change"]["n"] >= rules.min_queries]
    doubts = _unmeasured(latency, rules)
    if not enough:
        counts = ", ".join(f"{figures['change']['n']} {name}" for name, figures in judged) or "no query"
        doubts.append(f"too few queries to judge ({counts}; at least {rules.min_queries} are needed)")
    for name, figures in enough:
        change = figures["change"]
        if change["low"] < -rules.tolerance:
            doubts.append(f"over {change['n']} {name}, recall@10 went from {change['old']:.3f} to {change['new']:.3f} "
                          f"({_percent(change['change'])}); the fall could be as large as {-change['low']:.3f} "
                          f"(95% interval), more than the tolerance {rules.tolerance}: more queries narrow it")
    if doubts:
        return {"verdict": INCONCLUSIVE, "exit_status": EXIT_STATUS[INCONCLUSIVE], "reasons": doubts}
    said = "; ".join(f"{name}: recall@10 {f['change']['old']:.3f} -> {f['change']['new']:.3f} "
                     f"(worst case {f['change']['low']:+.3f})" for name, f in enough)
    return {"verdict": GO, "exit_status": EXIT_STATUS[GO],
            "reasons": [f"no fall beyond the tolerance {rules.tolerance} with 95% confidence ({said})."]}
