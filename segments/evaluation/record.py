"""Each evaluation's record, and the verdict the swap respects.

An evaluation is kept as a SwitchEvent (step "eval"): its verdict, reasons and every figure, with the
models the model ledger records for its two columns (name, fingerprint, width). The latest record for
the same two models is "the last verdict" that `embedding_status`, the admin's panel and
`verify_embeddings` show; models, not column names, are matched, so the verdict follows the columns
through the swap's renames.

`require_go` is the swap's check: it reads the last verdict when it is at most RECENT old, or runs a
shorter evaluation (`swap_options`) and records it, then refuses a NO-GO, changing nothing, unless the
regression is accepted (`embedding_switch swap --accept-regression`), which is recorded too.
"""
from datetime import timedelta

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.utils import timezone

from segments.evaluation import sides
from segments.evaluation.verdict import NO_GO
from segments.models import SwitchEvent

STEP, OVERRIDDEN = "eval", "eval-accepted"
RECENT = timedelta(hours=24)
LOOKED_AT = 50  # the latest evaluations searched for the current models


class RegressionRefused(CommandError):
    """The swap met a NO-GO; nothing was changed."""


def _key(model):
    return {name: model.get(f"model_{name}") for name in ("name", "fingerprint", "dimensions")}


def record(report, using="default", by="embedding_eval"):
    """Save `report` as an "eval" SwitchEvent; the event."""
    details = {"verdict": report["verdict"], "reasons": report["reasons"], "mode": report["mode"], "by": by,
               "models": {"old": _key(report["old"]), "new": _key(report["new"])},
               "summary": summary(report), "report": report}
    return SwitchEvent.objects.using(using).create(step=STEP, details=details)


def latest(using="default", since=None):
    """The latest "eval" event for the models of the two columns now (None when there is none, or at
    a phase with one column)."""
    try:
        _, old, new = sides.plan(using)
    except (sides.EvaluationError, ImproperlyConfigured):  # one column only; no model ledger yet
        return None
    wanted = {"old": _key(old.as_dict()), "new": _key(new.as_dict())}
    events = SwitchEvent.objects.using(using).filter(step=STEP)
    if since is not None:
        events = events.filter(at__gte=since)
    return next((event for event in events.order_by("-at", "-id")[:LOOKED_AT]
                 if (event.details or {}).get("models") == wanted), None)


def last_verdict(using="default"):
    """The last verdict for the current columns, for the status, the admin and verify: the record's
    summary with "at", "age_seconds" and "event", or None."""
    event = latest(using)
    if event is None:
        return None
    return {**event.details["summary"], "by": event.details.get("by"), "at": event.at.isoformat(),
            "age_seconds": round((timezone.now() - event.at).total_seconds()), "event": event.pk}


def no_go(verdict):
    """Why the swap would refuse now, for the status: `verdict` (last_verdict's) is a recent NO-GO; else None."""
    if verdict is None or verdict["verdict"] != NO_GO or verdict["age_seconds"] > RECENT.total_seconds():
        return None
    return (f"the last evaluation ({verdict['mode']} mode) says NO-GO: {verdict['reasons'][0]} `python manage.py "
            "embedding_eval` shows every figure; `python manage.py embedding_switch swap --accept-regression` swaps "
            "anyway.")


def swap_options():
    """The shorter evaluation the swap runs when none is recent: fewer queries, one ef_search."""
    from django.conf import settings

    from segments.evaluation.run import Options

    return Options(queries=100, neighbours=200, logged=0, latency_queries=10, ef_search=(settings.HNSW_EF_SEARCH,),
                   seconds=60.0)


def require_go(using="default", accept_regression=False, encoder=None):
    """The swap's check (module docstring): the verdict it went by (a summary), None when no evaluation
    could run; RegressionRefused for a NO-GO not accepted."""
    from segments.evaluation.run import evaluate

    event = latest(using, since=timezone.now() - RECENT)
    if event is None:
        try:
            report = evaluate(using, swap_options(), {"new": encoder} if encoder is not None else None)
        except sides.EvaluationError:
            return None
        event = record(report, using, by="embedding_switch swap")
    if event.details["verdict"] != NO_GO:
        return event.details["summary"]
    if not accept_regression:
        raise RegressionRefused(refusal(event))
    SwitchEvent.objects.using(using).create(step=OVERRIDDEN,
                                            details={"eval": event.pk, "reasons": event.details["reasons"]})
    return event.details["summary"]


def refusal(event):
    details = event.details
    reasons = "".join(f"\n  - {reason}" for reason in details["reasons"])
    return (f"Swap refused, nothing changed: the evaluation of {details['summary']['new_model']} against "
            f"{details['summary']['old_model']} ({details['mode']} mode, {event.at:%Y-%m-%d %H:%M} UTC) says NO-GO:"
            f"{reasons}\nSee every figure with `python manage.py embedding_eval`. To swap anyway, accepting the "
            "regression: `python manage.py embedding_switch swap --accept-regression`.")


def summary(report):
    """The figures the status, the admin's chart and verify show (a small part of the report)."""
    from segments.evaluation.run import judged_sets

    sets = judged_sets(report["mode"], report)
    first = sets[0][1] if sets else None
    return {"verdict": report["verdict"], "reasons": report["reasons"], "mode": report["mode"],
            "old_model": report["old"]["model"], "new_model": report["new"]["model"],
            "old_column": report["old"]["column"], "new_column": report["new"]["column"],
            "judged": [{"set": name, **{k: figures["change"][k] for k in ("n", "old", "new", "change", "low", "high")}}
                       for name, figures in sets],
            "slices": [] if first is None else [
                {"label": f"{entry['slice']}: {entry['value']}", **{k: entry["change"][k] for k in ("n", "old", "new")}}
                for entry in first["slices"]],
            "curves": {label: [{"ef_search": p["ef_search"], "recall_at_10": p["recall_at_10"], "p95_ms": p["p95_ms"]}
                               for p in side["curve"]["points"]] for label, side in report["latency"].items()},
            "problems": report["health"]["new"]["problems"]}
