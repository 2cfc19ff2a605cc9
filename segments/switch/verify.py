"""Checks that the new embeddings are complete, sound and searchable (`manage.py verify_embeddings`).

Run it before the swap (on `embedding_384`) and after it (on `embedding`). Each check gives a
Check whose `ok` is True (passed), False (failed: the message says what to do) or None
(reported, not judged). The checks:

- coverage: every segment with non-blank text has a vector, and none is quarantined; a segment that
  arrived (or whose text changed) in the last ARRIVING_SECONDS while a follower runs is being
  embedded, not missing: counted and named, not failed;
- dimensions, unit_norms, finite: over the whole column in SQL (vector_dims, vector_norm);
- stale: a sample of rows re-encoded with the configured model; each stored vector must have
  cosine >= STALE_MIN_COSINE with the fresh one (a vector left from older text fails);
- index: the HNSW vector_cosine_ops index on the column exists and is valid (pg_index.indisvalid);
- index_used: EXPLAIN shows the search query served by that index;
- recall: recall@10 of the HNSW search against exact search (the same query with index scans
  off), the sampled rows' own vectors as queries, at the configured ef_search, within a time
  budget (RECALL_SECONDS; each query under statement_timeout RECALL_QUERY_SECONDS; timed-out
  queries are reported). Judged by its 95% confidence interval (segments/switch/recall.py):
  passes when the lower bound is >= MIN_RECALL, fails when the mean is below it (or nothing
  could be measured), and is reported, not judged, in between;
- legacy_overlap (while the legacy column exists, not judged): how many of the legacy top-10
  are also in the new top-10, the sampled rows' legacy and new vectors as queries (the old
  model cannot be run here);
- undo (after the swap, not judged): how many segments with text have no legacy vector, which
  an undo of the swap would not serve (edited or added since the swap);
- golden (with a golden file, not judged): hit@10 and MRR of real queries through the search;
- degenerate: the sampled vectors can serve a search: none zero, not collapsed (nearly the same vector
  for every text), not one vector for many different texts (segments/evaluation/health.py);
- evaluation (not judged): the last go/no-go verdict of `embedding_eval` for the two columns' models.
"""
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from segments.models import HNSW_EF_CONSTRUCTION, HNSW_M
from segments.schema import TABLE, WAITING_SINCE, SchemaNotReady, blank_sql, embedding_schema, pending_sql
from segments.search import cosine_index, explain_nearest, search
from segments.switch import recall
from segments.switch.backfill.heartbeat import ALIVE

RECALL_K = 10
MIN_RECALL = 0.95
STALE_MIN_COSINE = 0.99
NORM_TOLERANCE = 1e-3
LEGACY_OVERLAP_QUERIES = 20  # exact searches over the 1536-dim column are slow: a few suffice
SMALL_TABLE_ROWS = 10_000  # below this, the planner may rightly prefer a sequential scan
RECALL_SECONDS = 60.0  # the recall check's time budget: exact searches scan the whole table
RECALL_QUERY_SECONDS = 10.0  # statement_timeout of each recall query
ARRIVING_SECONDS = 10  # a pending segment this young, with a follower running, is being embedded


class GoldenFileError(ValueError):
    """The golden queries file cannot be read; the message shows the expected format."""


@dataclass
class Check:
    name: str
    ok: bool | None  # None: reported, not judged
    message: str
    figures: dict = field(default_factory=dict)


@dataclass
class Report:
    phase: str
    column: str | None
    checks: list = field(default_factory=list)

    @property
    def failures(self):
        return [check.name for check in self.checks if check.ok is False]

    @property
    def passed(self):
        return not self.failures

    def as_dict(self):
        return {"passed": self.passed, "phase": self.phase, "column": self.column,
                "checks": {c.name: {"ok": c.ok, "message": c.message, **c.figures} for c in self.checks}}


def verify(*, sample=100, golden=None, encoder=None, ef_search=None, recall_seconds=RECALL_SECONDS,
           recall_query_seconds=RECALL_QUERY_SECONDS, using="default"):
    """Run every check on the table's new vector column; returns a Report.

    `golden` is a list of (query, [expected segment ids]) as read_golden() gives it. The recall
    check stops after `recall_seconds`, each of its queries after `recall_query_seconds`.
    """
    try:
        schema = embedding_schema(using)
    except SchemaNotReady as exc:
        return Report("missing", None, [Check("phase", False, str(exc))])
    if schema.vector_column is None:
        return Report(schema.phase, None, [Check("phase", False, (
            "segments has no column for the new model yet (phase legacy): apply phase 1 with `manage.py migrate`, "
            "then run `manage.py backfill_embeddings`."))])
    column, ef_search = schema.vector_column, ef_search or settings.HNSW_EF_SEARCH
    report = Report(schema.phase, column)
    with connections[using].cursor() as cursor:
        rows = _sample(cursor, column, schema.legacy_column, sample)
        report.checks.append(_coverage(cursor, column))
        vector_checks, embedded = _vector_checks(cursor, column, schema.vector_dimensions)
    report.checks.extend(vector_checks)
    report.checks.append(_degenerate(rows, column))
    model_check, encoder = _model(column, encoder, using)
    report.checks.append(model_check)
    report.checks.append(_stale(rows, column, schema.vector_dimensions, encoder) if model_check.ok else
                         Check("stale", None, "Skipped: no text is embedded with another model than the column's."))
    index_check = _index(column, schema.phase, schema.storage, using)
    report.checks.append(index_check)
    usable = index_check.ok and bool(rows)
    report.checks.append(_index_used(rows, column, index_check, embedded, ef_search, using) if usable
                         else Check("index_used", None, "Skipped: no valid index or no vectors to search."))
    report.checks.append(_recall(rows, column, ef_search, recall_seconds, recall_query_seconds, using) if usable
                         else Check("recall", None, "Skipped: no valid index or no vectors to search."))
    if schema.legacy_column:
        report.checks.append(_legacy_overlap(rows, column, schema.legacy_column, ef_search, using))
    if schema.phase == "swapped":
        report.checks.append(_undo(using))
    if schema.legacy_column:
        report.checks.append(_last_verdict(using))
    if golden and model_check.ok:
        report.checks.append(_golden(golden, encoder, using))
    return report


def _model(column, encoder, using):
    """(the "model" Check, the encoder to re-encode with): the model the ledger records for the column
    against the one configured (segments.search.reader_for); another is refused before any text is
    embedded."""
    from embeddings import ledger
    from segments.search import reader_for

    try:
        encoder = reader_for(column, using, encoder, doing="verify_embeddings")
    except ImproperlyConfigured as exc:  # ModelMismatch, ModelUnavailable
        return Check("model", False, str(exc)), None
    with connections[using].cursor() as cursor:
        recorded = ledger.entry(cursor, TABLE, column)
    if recorded is None:
        return Check("model", True, f"No model is recorded for segments.{column} yet; its stored vectors are "
                                    f"{ledger.identity_of(encoder).name}'s."), encoder
    return Check("model", True, f"segments.{column} holds {recorded}; the configured model is the same.",
                 {"model": recorded.identity.name, "fingerprint": recorded.identity.short_fingerprint,
                  "source": recorded.source}), encoder


def _degenerate(rows, column):
    """Vectors that cannot serve a search, in the sample (segments.evaluation.health)."""
    from segments.evaluation import health

    if len(rows) < 2:
        return Check("degenerate", None, "Skipped: too few vectors to compare.")
    found = health.check(np.array([vector for _, _, vector, _ in rows]), [text for _, text, _, _ in rows],
                         f"segments.{column}")
    figures = {k: found[k] for k in ("vectors", "zero", "median_distance", "collapsed", "duplicated")}
    if found["problems"]:
        return Check("degenerate", False, " ".join(found["problems"]) + " Re-embed the column with a model that "
                     "works (`manage.py embedding_eval` judges one before the swap).", figures)
    if found["median_distance"] is None:
        return Check("degenerate", None, "Skipped: the sampled segments have one text.", figures)
    return Check("degenerate", True, f"{found['vectors']} sampled vectors can serve a search: none zero, median "
                                     f"distance between different texts {found['median_distance']:.3f}.", figures)


def _last_verdict(using):
    """The last go/no-go verdict for the two columns' models (reported, not judged)."""
    from segments.evaluation.record import last_verdict

    found = last_verdict(using)
    if found is None:
        return Check("evaluation", None, "No evaluation yet for these two models: `manage.py embedding_eval` judges "
                                         "the new model before the swap.")
    reasons = " ".join(found["reasons"])
    return Check("evaluation", None, f"The last evaluation ({found['mode']} mode, {found['at'][:16]}) says "
                 f"{found['verdict']}: {reasons}", {"verdict": found["verdict"], "event": found["event"]})


def _undo(using):
    from segments.switch.swap import legacy_vectors_lacking

    with connections[using].cursor() as cursor:
        lacking = legacy_vectors_lacking(cursor)
    return Check("undo", None, (
        f"An undo of the swap would serve no legacy vector for {lacking:,} segment(s) with text (edited or "
        "added since the swap: their legacy vectors were cleared rather than left stale)."),
        {"legacy_vectors_lacking": lacking})


def _parse_vector(text):
    return None if text is None else np.array(text[1:-1].split(","), dtype=np.float32)


def _sample(cursor, column, legacy_column, size):
    """Up to `size` random rows with a vector: (id, text, vector, legacy vector or None)."""
    legacy = f"{legacy_column}::text" if legacy_column else "NULL"
    # Pick the ids first: the vectors are read (and formatted) for the sample only.
    cursor.execute(f"""
        SELECT id, text, {column}::text, {legacy} FROM segments WHERE id IN (
            SELECT id FROM segments WHERE {column} IS NOT NULL ORDER BY random() LIMIT %s)""", [size])
    return [(pk, text, _parse_vector(vector), _parse_vector(old)) for pk, text, vector, old in cursor.fetchall()]


def _coverage(cursor, column):
    followers = _followers(cursor, column)
    # The pending segments and those of them arriving now, counted in one statement (one snapshot): counted
    # apart, an arrival between the two, or a segment embedded between them, would make the difference lie.
    arriving = (f"""(SELECT count(*) FROM segments s LEFT JOIN segments_pending_since p ON p.segment_id = s.id
                     WHERE {pending_sql(column)} AND {WAITING_SINCE} > now() - make_interval(secs => %s))"""
                if followers else "0")
    cursor.execute(f"""
        SELECT count(*) FILTER (WHERE NOT {blank_sql()}), count(*) FILTER (WHERE {pending_sql(column)}),
               count(*) FILTER (WHERE {blank_sql()}),
               (SELECT count(*) FROM embeddings_quarantine q JOIN segments s ON s.id = q.segment_id), {arriving}
        FROM segments s""", [ARRIVING_SECONDS] if followers else None)
    with_text, pending, blank, quarantined, arriving = cursor.fetchone()
    missing = pending - arriving
    figures = {"segments_with_text": with_text, "missing": missing, "arriving": arriving, "quarantined": quarantined,
               "blank": blank}
    if missing or quarantined:
        return Check("coverage", False, (
            f"{missing:,} of {with_text:,} segments with text have no vector; {quarantined:,} are quarantined. "
            "Run `manage.py backfill_embeddings` (with `--retry-quarantined` for quarantined rows)."), figures)
    now = (f"; {arriving:,} arrived in the last {ARRIVING_SECONDS} s, the follower ({', '.join(followers)}) embeds them"
           if arriving else "")
    return Check("coverage", True, f"All {with_text - arriving:,} segments with text have a vector{now}; none "
                                   f"quarantined; {blank:,} blank (no vector by design).", figures)


def _followers(cursor, column):
    """The followers running now that fill `column` (a pending segment they are embedding is arriving, not
    missing): none before migration 0009."""
    cursor.execute("SELECT to_regclass('segments_pending_since') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return []
    cursor.execute(f"SELECT w.worker_name FROM segments_backfill_worker w WHERE {ALIVE} AND w.mode LIKE %s "
                   "AND w.\"column\" IN (%s, '') ORDER BY w.worker_name", ["follow%", column])
    return [name for (name,) in cursor.fetchall()]


def _vector_checks(cursor, column, dimensions):
    """The dimensions, unit_norms and finite checks over the whole column, and the vector count."""
    cursor.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE vector_dims({column}) <> %s),
               count(*) FILTER (WHERE vector_norm({column}::vector) = 'NaN'),
               count(*) FILTER (WHERE abs(vector_norm({column}::vector) - 1) > %s),
               min(vector_norm({column}::vector)), max(vector_norm({column}::vector))
        FROM segments WHERE {column} IS NOT NULL""", [dimensions, NORM_TOLERANCE])
    count, wrong_dims, nans, off_norm, min_norm, max_norm = cursor.fetchone()
    fix = "Re-embed those rows: set the column to NULL for them and run `manage.py backfill_embeddings`."
    checks = [
        Check("dimensions", not wrong_dims, f"{wrong_dims:,} of {count:,} vectors do not have {dimensions} "
              f"dimensions. {fix}" if wrong_dims else f"All {count:,} vectors have {dimensions} dimensions.",
              {"vectors": count, "wrong_dimensions": wrong_dims}),
        Check("unit_norms", not off_norm, (f"{off_norm:,} of {count:,} vectors are not of unit length "
              f"(±{NORM_TOLERANCE}); norms range {min_norm:.6f}..{max_norm:.6f}. {fix}") if off_norm else
              f"All vectors have unit length (±{NORM_TOLERANCE})." if count else "No vectors yet.",
              {"off_norm": off_norm, "min_norm": min_norm, "max_norm": max_norm}),
        Check("finite", not nans, f"{nans:,} vectors hold NaN. {fix}" if nans else "No vector holds NaN.",
              {"nan": nans}),
    ]
    return checks, count


def _stale(rows, column, dimensions, encoder):
    if not rows:
        return Check("stale", None, "Skipped: no vectors to re-encode.")
    try:
        encoder = encoder or _service()
        encoder.check_dimensions(column, dimensions)
        fresh = encoder.encode_documents([text for _, text, _, _ in rows])
    except ImproperlyConfigured as exc:
        return Check("stale", False, f"Cannot re-encode the sample: {exc}")
    cosines = np.array([float(np.dot(stored, new)) for (_, _, stored, _), new in zip(rows, fresh)])
    stale_ids = [pk for (pk, *_), cosine in zip(rows, cosines) if cosine < STALE_MIN_COSINE]
    figures = {"sampled": len(rows), "stale": len(stale_ids), "min_cosine": float(cosines.min()),
               "stale_ids": stale_ids[:20]}
    if stale_ids:
        return Check("stale", False, (
            f"{len(stale_ids)} of {len(rows)} sampled vectors differ from their text's fresh encoding "
            f"(cosine < {STALE_MIN_COSINE}; ids {', '.join(map(str, stale_ids[:20]))}): they were written by "
            f"another model or for older text. Set them to NULL and run `manage.py backfill_embeddings`, or "
            "set EMBEDDING_MODEL to the model that wrote them."), figures)
    return Check("stale", True, f"{len(rows)} sampled rows re-encoded: min cosine {cosines.min():.4f} "
                                f"(>= {STALE_MIN_COSINE}).", figures)


def _service():
    from embeddings.encoder import get_service

    return get_service()


def _index(column, phase, storage, using):
    index = cosine_index(column, using)
    opclass = storage.cosine_opclass
    if index is None:
        fix = ("Build it with `manage.py embedding_switch index`." if phase == "expanded" else
               f"Create it: CREATE INDEX CONCURRENTLY segments_embedding_hnsw ON segments USING hnsw "
               f"({column} {opclass}) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION});")
        return Check("index", False, f"segments.{column} has no HNSW {opclass} index. {fix}", {"index": None})
    name, valid = index
    if not valid:
        again = " (or `manage.py embedding_switch index`, which does it)" if phase == "expanded" else ""
        return Check("index", False, (
            f"The HNSW index {name} is INVALID (left by an interrupted build): queries ignore it. Rebuild it with "
            f"`REINDEX INDEX CONCURRENTLY {name};` in `manage.py dbshell`{again}."), {"index": name, "valid": False})
    return Check("index", True, f"{name} (hnsw, {opclass}) is valid.", {"index": name, "valid": True})


def _index_used(rows, column, index_check, embedded, ef_search, using):
    name, query = index_check.figures["index"], rows[0][2]
    uses = f"Index Scan using {name} "
    if uses in explain_nearest(query, k=RECALL_K, column=column, ef_search=ef_search, using=using):
        return Check("index_used", True, f"EXPLAIN: the search query is served by {name}.",
                     {"planner_uses_index": True})
    usable = uses in explain_nearest(query, k=RECALL_K, column=column, ef_search=ef_search, allow_seqscan=False,
                                     using=using)
    figures = {"planner_uses_index": False, "index_can_serve_query": usable}
    if usable and embedded < SMALL_TABLE_ROWS:
        return Check("index_used", True, (
            f"EXPLAIN: {name} can serve the search query; with {embedded:,} vectors the planner prefers a "
            "sequential scan, as it should on a table this small."), figures)
    if usable:
        return Check("index_used", False, (
            f"EXPLAIN: the planner scans all {embedded:,} vectors instead of using {name}. Run ANALYZE segments; "
            "check random_page_cost and that hnsw.ef_search is not set far above HNSW_EF_SEARCH."), figures)
    return Check("index_used", False, (
        f"EXPLAIN: {name} cannot serve the search query (its operator does not match the query's "
        "cosine distance). Rebuild it with the column type's cosine operator class (vector_cosine_ops or "
        "halfvec_cosine_ops)."), figures)


def _recall(rows, column, ef_search, seconds, query_seconds, using):
    """recall@10 of the HNSW search, bounded in time, judged by its 95% interval (segments.switch.recall)."""
    sample = recall.measure(rows, column=column, k=RECALL_K, ef_search=ef_search, seconds=seconds,
                            query_seconds=query_seconds, using=using)
    mean, (low, high) = sample.mean, sample.interval
    verdict = recall.verdict(mean, low, MIN_RECALL)
    figures = {"recall_at_10": mean, "ci95_low": low if mean is not None else None,
               "ci95_high": high if mean is not None else None, "ci_method": recall.METHOD, "verdict": verdict,
               "min_recall": MIN_RECALL, "queries": len(sample.recalls), "sampled": sample.sampled,
               "timed_out": len(sample.timed_out), "timed_out_ids": sample.timed_out[:20],
               "budget_seconds": seconds, "budget_spent": sample.budget_spent, "query_timeout_seconds": query_seconds,
               "seconds": round(sample.seconds, 2), "ef_search": ef_search}
    notes = _recall_notes(sample)
    if mean is None:
        return Check("recall", False, (
            f"No recall measured: {notes or 'no sampled query could be run'}. Run it at a quieter moment, or allow "
            "more time with --recall-query-seconds and --recall-seconds."), figures)
    message = (f"recall@{RECALL_K} = {mean:.3f}, 95% interval {low:.3f}..{high:.3f}, over {len(sample.recalls)} "
               f"queries at ef_search {ef_search}" + (f" ({notes})" if notes else ""))
    if verdict == "fail":
        return Check("recall", False, f"{message}: below {MIN_RECALL}. Raise HNSW_EF_SEARCH and verify again.",
                     figures)
    if verdict == "inconclusive":
        return Check("recall", None, (
            f"{message}: {MIN_RECALL} or more on average, not proven with 95% confidence. Verify with more queries "
            "(--sample, --recall-seconds) to be sure."), figures)
    return Check("recall", True, f"{message}: >= {MIN_RECALL} with 95% confidence.", figures)


def _recall_notes(sample):
    """What limited the recall sample: the budget, timed-out queries."""
    notes = []
    if sample.budget_spent:
        tried = len(sample.recalls) + len(sample.timed_out)
        notes.append(f"the {sample.seconds_budget:g} s budget was spent after {tried} of {sample.sampled} sampled queries")
    if sample.timed_out:
        ids = ", ".join(map(str, sample.timed_out[:20])) + (", ..." if len(sample.timed_out) > 20 else "")
        notes.append(f"{len(sample.timed_out)} timed out after {min(sample.query_seconds, sample.seconds_budget):g} s "
                     f"or less and are not counted (segment ids {ids})")
    return "; ".join(notes)


def _legacy_overlap(rows, column, legacy_column, ef_search, using):
    ids = [pk for pk, _, _, old in rows if old is not None][:LEGACY_OVERLAP_QUERIES]
    if not ids:
        return Check("legacy_overlap", None, "Skipped: no sampled row has both a legacy and a new vector.")
    overlaps = [len(set(legacy) & set(new)) / RECALL_K
                for legacy, new in _both_searches(ids, column, legacy_column, ef_search, using)]
    overlap = float(np.mean(overlaps))
    return Check("legacy_overlap", None, (
        f"On average {overlap:.0%} of the legacy top-{RECALL_K} are in the new top-{RECALL_K} "
        f"({len(ids)} queries; reported, not judged: two models rank differently)."),
        {"mean_overlap": overlap, "queries": len(ids)})


def _both_searches(ids, column, legacy_column, ef_search, using):
    """[(the legacy column's exact top ids, the new column's HNSW top ids)] of the rows `ids`' own vectors,
    in one message (one round trip for them all)."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT set_config('hnsw.ef_search', %(ef_search)s, true) WHERE NOT %(in_transaction)s; "
            f"""SELECT ARRAY(SELECT t.id FROM segments t WHERE t.{legacy_column} IS NOT NULL
                             ORDER BY (t.{legacy_column} <=> q.{legacy_column}) + 0 LIMIT %(k)s),
                       ARRAY(SELECT t.id FROM segments t WHERE t.{column} IS NOT NULL
                             ORDER BY t.{column} <=> q.{column} LIMIT %(k)s)
                FROM segments q WHERE q.id = ANY(%(ids)s) ORDER BY q.id""",
            {"ef_search": str(max(ef_search, RECALL_K)), "k": RECALL_K, "ids": list(ids),
             "in_transaction": connections[using].in_atomic_block})
        return cursor.fetchall()


def read_golden(path):
    """[(query, [expected segment ids])] from a JSON list of {"query", "expected"} or a CSV file
    with columns query,expected (ids separated by spaces, commas or semicolons)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            items = [(item["query"], item["expected"]) for item in json.loads(path.read_text())]
        else:
            with path.open(newline="") as handle:
                items = [(row["query"], row["expected"].replace(";", " ").replace(",", " ").split())
                         for row in csv.DictReader(handle)]
        golden = [(str(query), [int(pk) for pk in expected]) for query, expected in items]
        if not golden or any(not query.strip() or not expected for query, expected in golden):
            raise ValueError("every row needs a query and at least one expected id")
        return golden
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GoldenFileError(
            f"Cannot read golden queries from {path} ({exc}). Give a JSON list of "
            '{"query": "...", "expected": [ids]} or a CSV file with columns query,expected '
            "(ids separated by spaces)."
        ) from None


def _golden(queries, encoder, using):
    ranks = []
    try:
        for query, expected in queries:
            found = [hit.segment.pk for hit in search(query, k=RECALL_K, encoder=encoder or _service(), using=using)]
            ranks.append(next((rank for rank, pk in enumerate(found, 1) if pk in set(expected)), None))
    except ImproperlyConfigured as exc:
        return Check("golden", False, f"Cannot run the golden queries: {exc}")
    hit_rate = sum(rank is not None for rank in ranks) / len(ranks) if ranks else 0.0
    mrr = sum(1 / rank for rank in ranks if rank) / len(ranks) if ranks else 0.0
    misses = [query for (query, _), rank in zip(queries, ranks) if rank is None]
    return Check("golden", None, (
        f"{len(ranks)} golden queries: hit@{RECALL_K} {hit_rate:.3f}, MRR {mrr:.3f}"
        + (f"; no expected segment in the top {RECALL_K} for: {'; '.join(misses[:5])}" if misses else "") + "."),
        {"queries": len(ranks), "hit_at_10": hit_rate, "mrr": mrr, "misses": misses})
