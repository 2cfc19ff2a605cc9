"""One evaluation, from the table's phase to the verdict (`evaluate`); the command, the swap and the
tests call it. It reads the table in short read-only transactions, each statement under the
statement timeout, and writes nothing but its record (a SwitchEvent, segments.evaluation.record).
"""
import random
import time
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.utils import timezone

from segments.evaluation import health, latency, metrics, neighbours, queries, searching, sides, table
from segments.evaluation.verdict import Rules, decide

HEALTH_ROWS = 1000  # vectors of each column looked at for zero, collapsed and duplicated ones
CHUNK = searching.MAX_BATCH  # questions per read-only transaction (a few statements: searching.py)


@dataclass
class Options:
    mode: str = sides.AUTO
    queries: int = 300  # known-item queries
    neighbours: int = 300  # segments whose stored-vector neighbours are judged
    pool: int = 10_000  # segments (whole videos) the stored-vector neighbours are found among
    labelled: list | None = None  # [Query] from queries.read_labelled
    logged: int = 200  # the most recent logged questions replayed (0: none)
    window: float = 10.0  # seconds around a moment that still count as the same moment
    ef_search: tuple = latency.DEFAULT_EF_SEARCH
    latency_queries: int = 30
    seconds: float = 300.0  # the searches' time budget
    statement_timeout: float = 30.0
    seed: int = 0
    download: bool = False  # --mode models may download a model that is not here
    rules: Rules = field(default_factory=lambda: Rules(tolerance=settings.EMBEDDING_EVAL_TOLERANCE,
                                                       max_search_p95_ms=settings.EMBEDDING_EVAL_MAX_SEARCH_MS,
                                                       max_embed_p95_ms=settings.EMBEDDING_EVAL_MAX_EMBED_MS))

    def as_dict(self):
        shown = asdict(self)
        shown["labelled"] = len(self.labelled) if self.labelled else 0
        return shown


def evaluate(using="default", options=None, encoders=None, progress=None):
    """The evaluation report (a JSON-serialisable dict with "verdict", "exit_status", "reasons" and every
    figure). EvaluationError when it cannot run; SchemaNotReady without the table."""
    options, encoders, say = options or Options(), encoders or {}, progress or (lambda line: None)
    started = time.monotonic()
    phase, old, new = sides.plan(using)
    judged_rows = _judged_rows(using, options, old, new)
    mode, why = _mode(using, options, encoders, old, new)
    say(f"mode: {mode} ({why})")
    report = {"phase": phase, "mode": mode, "mode_why": why, "old": old.as_dict(), "new": new.as_dict(),
              "rows": judged_rows, "ef_search": settings.HNSW_EF_SEARCH, "options": options.as_dict(),
              "at": timezone.now().isoformat()}
    budget = searching.Budget(options.seconds, options.statement_timeout)
    pool = _pool(using, options, old, new)
    say(f"stored vectors: {len(pool['ids'])} segments of whole videos")
    report["health"] = {side.label: _health(pool, side) for side in (old, new)}
    report["neighbours"] = neighbours.judge(pool["rows"], pool["ids"], pool["old"], pool["new"],
                                            options.neighbours, options.seed, options.window)
    report["queries"] = _queries(using, options, mode, old, new, budget, say)
    report["latency"] = _latency(using, options, old, new, pool, budget, say)
    report["budget"] = budget.as_dict()
    problems = report["health"]["new"]["problems"]
    report.update(decide(judged_sets(mode, report), problems, _new_latency(report), options.rules))
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _mode(using, options, encoders, old, new):
    """(mode, why), each side given its encoder where its model runs here (sides.attach)."""
    if options.mode != sides.STORED:
        sides.attach(old, using, encoders.get("old"), options.download)
    sides.attach(new, using, encoders.get("new"), options.download)
    return sides.choose_mode(options.mode, old, new)


def _health(pool, side):
    texts = [row.text for row in pool["sample_rows"][:HEALTH_ROWS]]
    return health.check(pool[f"sample_{side.label}"][:HEALTH_ROWS], texts, f"segments.{side.column.name}")


def _judged_rows(using, options, old, new):
    with table.reading(using, options.statement_timeout) as cursor:
        with_text, judged = table.counts(cursor, old.column.name, new.column.name)
    if not judged:
        raise sides.EvaluationError(
            f"No segment has both vectors yet (segments.{old.column.name} and segments.{new.column.name}): run "
            "`python manage.py backfill_embeddings` (a part is enough, `--limit N`), then evaluate again.")
    return {"with_text": with_text, "judged": judged, "share": judged / with_text if with_text else None}


def _pool(using, options, old, new):
    """Whole videos' segments with both vectors: their rows, texts and each column's vectors."""
    with table.reading(using, options.statement_timeout) as cursor:
        ids = table.pool_ids(cursor, old.column.name, new.column.name, options.pool, options.seed)
        rows = table.segments(cursor, ids)
        found, (old_matrix, new_matrix) = table.vectors(cursor, ids, [old.column, new.column])
    order = [int(pk) for pk in found]
    picks = list(range(len(order)))
    random.Random(options.seed).shuffle(picks)  # a sample in no order of ids or videos
    return {"ids": order, "rows": rows, "old": old_matrix, "new": new_matrix,
            "sample_rows": [rows[order[i]] for i in picks], "sample_old": old_matrix[picks],
            "sample_new": new_matrix[picks]}


def _queries(using, options, mode, old, new, budget, say):
    """{"known_item", "labelled", "logged", "logged_judged"}: each set's figures, or None."""
    with table.reading(using, options.statement_timeout) as cursor:
        rows = table.segments(cursor, table.sample_ids(cursor, old.column.name, new.column.name, options.queries,
                                                       options.seed))
        logged = queries.logged(cursor, options.logged if mode == sides.MODELS else 0)
        if options.labelled:
            queries.resolve(cursor, options.labelled, options.window)
    sets = {"known_item": queries.known_items([rows[pk] for pk in sorted(rows)], options.seed),
            "labelled": options.labelled or [], "logged": logged or []}
    sets["logged_judged"] = queries.judged_subset(sets["logged"], sets["labelled"])
    found = {}
    for name, asked in sets.items():
        if asked:
            say(f"{name.replace('_', ' ')}: {len(asked)} queries")
        found[name] = _run_set(using, options, mode, old, new, asked, budget) if asked else None
    found["logged_table"] = None if logged is None else queries.LOGGED_TABLE
    return found


def _run_set(using, options, mode, old, new, asked, budget):
    runs = [side for side in (old, new) if side.encoder is not None and (mode == sides.MODELS or side is new)]
    hits = {side.label: _search_all(using, options, side, old if side is new else new, asked, budget)
            for side in runs}
    kept = [i for i in range(len(asked)) if all(hits[label][i] is not None for label in hits)]
    kept_queries = [asked[i] for i in kept]
    figures = {"asked": len(asked), "n": len(kept)}
    lists = {label: [[hit[0] for hit in hits[label][i]] for i in kept] for label in hits}
    if len(hits) == 2:
        figures["agreement"] = metrics.agreement(lists["old"], lists["new"])
    if kept_queries and kept_queries[0].answers is None:  # logged questions: agreement only
        return figures
    ranks = {label: [metrics.rank_of(hits[label][i], asked[i].answers, options.window) for i in kept]
             for label in hits}
    if len(hits) == 2:
        figures.update(metrics.judged(kept_queries, ranks["old"], ranks["new"]))
    elif "new" in ranks:
        figures["new"] = metrics.side(ranks["new"])
    return figures


def _search_all(using, options, side, other, asked, budget):
    vectors = side.encoder.encode_queries([query.text for query in asked]) if asked else []
    found = []
    for start in range(0, len(asked), CHUNK):
        with table.reading(using, options.statement_timeout) as cursor:
            found.extend(searching.judged_hits(cursor, budget, vectors[start:start + CHUNK], side.column,
                                               other.column, settings.HNSW_EF_SEARCH, using))
    return found


def _latency(using, options, old, new, pool, budget, say):
    """{"old", "new"}: {"embed": timings or None, "curve": latency.curve} of each side."""
    texts = [q.text for q in queries.known_items(pool["sample_rows"][: options.latency_queries], options.seed)]
    efs = sorted(set(options.ef_search) | {settings.HNSW_EF_SEARCH})
    shown = {}
    for side, matrix in ((old, pool["sample_old"]), (new, pool["sample_new"])):
        say(f"latency: {side.label} side")
        vectors = (side.encoder.encode_queries(texts) if side.encoder is not None and texts
                   else matrix[: options.latency_queries])
        with table.reading(using, options.statement_timeout) as cursor:
            curve = latency.curve(cursor, budget, list(vectors), side.column, efs, using)
        shown[side.label] = {"embed": latency.embedding(side.encoder, texts), "curve": curve,
                             "questions": "embedded questions" if side.encoder is not None and texts else
                             "stored vectors of sampled segments"}
    return shown


def _new_latency(report):
    new = report["latency"]["new"]
    point = next((p for p in new["curve"]["points"] if p["ef_search"] == report["ef_search"]), None)
    search = point["p95_ms"] if point else new["curve"]["exact"].get("p95_ms")
    return {"search_p95_ms": search, "embed_p95_ms": (new["embed"] or {}).get("p95_ms"),
            "ef_search": report["ef_search"]}


def judged_sets(mode, report):
    """[(name, figures)] of the sets the verdict judges in this mode."""
    if mode == sides.STORED:
        return [("segments judged by their stored neighbours", report["neighbours"])]
    found = report["queries"]
    names = (("known_item", "known-item queries"), ("labelled", "labelled queries"),
             ("logged_judged", "logged questions with labels"))
    return [(label, found[key]) for key, label in names if found.get(key) and "change" in found[key]]
