"""Phase 3b: make the new vectors the live `embedding` column, in one short locked step.

`swap()` (migration 0007, run by `manage.py embedding_switch swap`) refuses, changing nothing,
unless the HNSW index is valid and nothing pending is quarantined. Then, in one transaction:

1. `LOCK TABLE segments IN EXCLUSIVE MODE`, under lock_timeout: the application's writes wait,
   its reads go on. Segments that arrived or changed since the last backfill pass are embedded
   here, with the model the command loaded beforehand, when they are few enough to take no
   longer than the lock budget (`catch_up`); otherwise the swap gives up, changing nothing, and
   says how many rows it was racing (the command then runs another backfill pass and tries
   again).
2. Completeness is checked again: under this lock no writer can add a row without a vector.
3. `ACCESS EXCLUSIVE` for the renames: `embedding` -> `embedding_legacy`, `embedding_384` ->
   `embedding`, their indexes, the staleness trigger (which from now on also clears the
   legacy vector of an edited text, so an undo never serves a stale one), and the views that
   select `embedding` are created again so that they serve the new column (a view binds its
   columns by position, and would otherwise go on serving the legacy vectors).

The undo (`unswap`) is the same in reverse. Both report how long they held their locks.
"""
import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from django.core.management.base import CommandError
from django.db import connections

from segments import triggers
from segments.schema import blank_sql, pending_sql
from segments.switch import catalog

logger = logging.getLogger(__name__)

NEW, OLD = "embedding_384", "embedding"  # before the swap
LIVE, LEGACY = "embedding", "embedding_legacy"  # after it
HNSW = ("segments_embedding_384_hnsw", "segments_embedding_hnsw")
TODO = ("segments_embedding_384_todo", "segments_embedding_todo")
LEGACY_INDEX = "segments_embedding_legacy_idx"  # the legacy vector index's name while swapped


class SwapRefused(CommandError):
    """The swap found work left to do; nothing was changed."""


class SwapRaced(SwapRefused):
    """More segments arrived than the lock budget allows embedding under the lock."""

    def __init__(self, message, pending):
        super().__init__(message)
        self.pending = pending


@dataclass
class CatchUp:
    """What the swap may do under its lock: embed up to `max_rows` pending segments with `encoder`."""

    encoder: object
    max_rows: int
    writer: object = None  # VectorWriter factory; set by the caller (embeddings.writer.VectorWriter)


@dataclass
class SwapRecord:
    """What the last swap or undo did, for the command's report."""

    writes_blocked_ms: float = 0.0  # EXCLUSIVE or stronger held: the application's writes waited
    reads_blocked_ms: float = 0.0  # ACCESS EXCLUSIVE held: its reads waited too
    embedded_under_lock: int = 0
    views_recreated: list = field(default_factory=list)
    legacy_indexes: dict = field(default_factory=dict)  # name during the swap: name before it


_catch_up = ContextVar("swap_catch_up", default=None)
_record = ContextVar("swap_record", default=None)


@contextmanager
def catching_up(catch_up, record):
    """Run a swap in this block with `catch_up` allowed under its lock, filling `record`."""
    tokens = _catch_up.set(catch_up), _record.set(record)
    try:
        yield record
    finally:
        _catch_up.reset(tokens[0])
        _record.reset(tokens[1])


def missing_vectors(cursor, column):
    """(segments with non-blank text and no vector in `column`, of which quarantined)."""
    cursor.execute(
        f"""
        SELECT count(*), count(q.segment_id) FROM segments s
        LEFT JOIN embeddings_quarantine q ON q.segment_id = s.id
        WHERE {pending_sql(column)}
        """
    )
    return cursor.fetchone()


def refusal(using="default", column=NEW):
    """Why the swap would be refused now, or None if it would be accepted (pending rows that
    are not quarantined are not a reason: the swap embeds them)."""
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('segments') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return "There is no segments table: run `manage.py migrate`."
        from segments.schema import embedding_schema

        phase = embedding_schema(using).phase
        if phase != "expanded":
            return f"The table is in phase {phase}: the swap applies to the expanded phase only."
        _missing, quarantined = missing_vectors(cursor, column)
        valid = catalog.index_valid(cursor, HNSW[0])
    if quarantined:
        return (f"{quarantined} segment(s) with text are quarantined (the model could not embed them): "
                "`manage.py embedding_quarantine` lists them; fix or retry them with "
                "`manage.py backfill_embeddings --retry-quarantined`.")
    if valid is not True:
        state = "INVALID" if valid is False else "missing"
        return f"The HNSW index {HNSW[0]} is {state}: run `manage.py embedding_switch index`."
    return None


def check_ready(schema_editor, allow_pending=0):
    """SwapRefused unless the swap can go ahead with at most `allow_pending` rows left to embed."""
    with schema_editor.connection.cursor() as cursor:
        missing, quarantined = missing_vectors(cursor, NEW)
    if quarantined:
        raise SwapRefused(
            f"Swap refused, nothing changed: {quarantined} segment(s) with text are quarantined "
            "(`manage.py embedding_quarantine` lists them; `manage.py backfill_embeddings "
            "--retry-quarantined` tries them again)."
        )
    if missing > allow_pending:
        if _catch_up.get() is not None:
            raise SwapRaced(
                f"Swap gave up, nothing changed: {missing} segment(s) arrived or changed since the last "
                f"backfill pass, more than can be embedded under the lock ({allow_pending}).", missing)
        raise SwapRefused(
            f"Swap refused, nothing changed: {missing} segment(s) with text have no 384-dim vector yet. "
            "Run `manage.py embedding_switch swap`: it embeds them first."
        )
    with schema_editor.connection.cursor() as cursor:
        valid = catalog.index_valid(cursor, HNSW[0])
    if valid is not True:
        raise SwapRefused(
            f"Swap refused, nothing changed: the HNSW index {HNSW[0]} is missing or INVALID. "
            "Run `manage.py embedding_switch index` first."
        )


def _embed_pending(schema_editor, catch_up):
    """Embed the pending segments inside the swap's transaction (the table is locked against
    writes); returns how many. Any segment the model cannot embed refuses the swap."""
    from segments.switch.backfill.encode import encode_texts

    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT s.id, s.text, md5(s.text)::uuid FROM segments s WHERE {pending_sql(NEW)} ORDER BY s.id")
        rows = cursor.fetchall()
    if not rows:
        return 0
    ids, texts, md5s = zip(*rows)
    dims = catch_up.encoder.dimensions
    vectors, reasons = encode_texts(catch_up.encoder, list(texts), dims)
    failed = [(i, reason) for i, reason in zip(ids, reasons) if reason is not None]
    if failed:
        raise SwapRefused(
            f"Swap refused, nothing changed: the model could not embed {len(failed)} segment(s) that "
            f"arrived meanwhile (segment {failed[0][0]}: {failed[0][1]}). Run `manage.py backfill_embeddings` "
            "(it quarantines them with the reason), then `manage.py embedding_switch swap` again."
        )
    import numpy as np

    from segments.switch.user_triggers import quiet_user_triggers

    with schema_editor.connection.cursor() as cursor:
        quiet_user_triggers(cursor, local=True)  # for this transaction: the renames follow in it
    writer = catch_up.writer(schema_editor.connection, NEW, dims)
    return writer.write(list(ids), list(md5s), np.stack(vectors))


def _rename_columns(schema_editor, pairs):
    for old, new in pairs:
        schema_editor.execute(f"ALTER TABLE segments RENAME COLUMN {old} TO {new}")


def _rename_indexes(schema_editor, pairs):
    for old, new in pairs:
        if old != new:
            schema_editor.execute(f"ALTER INDEX {schema_editor.quote_name(old)} RENAME TO {schema_editor.quote_name(new)}")


def _views_on(schema_editor, column):
    """The views selecting segments.`column`, which must be created again after the rename.
    SwapRefused, before anything changes, for those that cannot be."""
    with schema_editor.connection.cursor() as cursor:
        views = catalog.dependent_views(cursor, column)
    blocked = [view for view in views if view.kind != "view" or view.has_dependents]
    if blocked:
        names = ", ".join(f"{view.name} ({view.kind}{', with views built on it' if view.has_dependents else ''})"
                          for view in blocked)
        raise SwapRefused(
            f"Swap refused, nothing changed: {names} select(s) segments.{column}. A materialized view, or a "
            "view other views are built on, cannot be re-pointed to the new column safely: drop it (and "
            "create it again after the swap), then run the swap again."
        )
    return views


def _locked_steps(schema_editor, record, *, forward, catch_up, columns, trigger_columns, index_pairs):
    """The swap or its undo, under EXCLUSIVE then ACCESS EXCLUSIVE; fills `record`."""
    views = _views_on(schema_editor, columns[0][0])
    schema_editor.execute("LOCK TABLE segments IN EXCLUSIVE MODE")
    writes_from = time.perf_counter()
    if forward:
        if catch_up is not None:
            check_ready(schema_editor, allow_pending=catch_up.max_rows)
            record.embedded_under_lock = _embed_pending(schema_editor, catch_up)
        check_ready(schema_editor)  # again: under this lock no writer can add a row without a vector
    schema_editor.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
    reads_from = time.perf_counter()
    for view in views:
        schema_editor.execute(f"DROP VIEW {view.name}")
    _rename_columns(schema_editor, columns)
    _rename_indexes(schema_editor, index_pairs)
    schema_editor.execute(triggers.create_sql(*trigger_columns))
    for view in views:
        for statement in catalog.recreate_view_sql(view):
            schema_editor.execute(statement)
    record.views_recreated = [view.name for view in views]
    done = time.perf_counter()
    # The commit follows at once (the migration is atomic); the command adds its time.
    record.writes_blocked_ms = (done - writes_from) * 1000
    record.reads_blocked_ms = (done - reads_from) * 1000
    logger.info("segments swap: writes blocked %.1f ms, reads blocked %.1f ms before commit",
                record.writes_blocked_ms, record.reads_blocked_ms)
    return record


def _legacy_index_names(schema_editor, column, rename):
    """{current name: name after the step} for the vector indexes on the legacy column."""
    with schema_editor.connection.cursor() as cursor:
        indexes = [index.name for index in catalog.column_indexes(cursor, column) if index.method != "btree"]
    return {name: rename(name) for name in indexes}


def swap(apps, schema_editor):
    catch_up = _catch_up.get()
    check_ready(schema_editor, allow_pending=catch_up.max_rows if catch_up else 0)
    record = _record.get() or SwapRecord()
    legacy = _legacy_index_names(schema_editor, OLD, lambda name: LEGACY_INDEX)
    if len(legacy) > 1:  # more than one: keep each name recognisable
        legacy = {name: f"{name}_legacy"[:63] for name in legacy}
    record.legacy_indexes = {new: old for old, new in legacy.items()}
    _locked_steps(schema_editor, record, forward=True, catch_up=catch_up, columns=[(OLD, LEGACY), (NEW, LIVE)],
                  trigger_columns=(LIVE, LEGACY), index_pairs=[*legacy.items(), HNSW, TODO])
    _log_event(schema_editor, "swap", record)


def unswap(apps, schema_editor):
    record = _record.get() or SwapRecord()
    before = _last_swap_indexes(schema_editor)
    legacy = _legacy_index_names(schema_editor, LEGACY, lambda name: before.get(name, name))
    _locked_steps(schema_editor, record, forward=False, catch_up=None, columns=[(LIVE, NEW), (LEGACY, OLD)],
                  trigger_columns=(NEW,), index_pairs=[*legacy.items(), HNSW[::-1], TODO[::-1]])
    record.legacy_indexes = legacy
    _log_event(schema_editor, "undo", record)


def _last_swap_indexes(schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT details FROM segments_switch_event WHERE step = 'swap' ORDER BY at DESC, id DESC LIMIT 1")
        row = cursor.fetchone()
    details = row[0] if row else {}
    if isinstance(details, str):
        import json

        details = json.loads(details)
    return details.get("legacy_indexes", {})


def _log_event(schema_editor, step, record):
    import json
    from dataclasses import asdict

    with schema_editor.connection.cursor() as cursor:
        cursor.execute("INSERT INTO segments_switch_event (step, at, details) VALUES (%s, now(), %s)",
                       [step, json.dumps(asdict(record))])


def legacy_vectors_lacking(cursor):
    """Segments with text whose legacy vector is missing (cleared by an edit after the swap, or
    inserted after it): what an undo of the swap would not serve."""
    cursor.execute(f"SELECT count(*) FROM segments s WHERE s.{LEGACY} IS NULL AND NOT ({blank_sql()})")
    return cursor.fetchone()[0]
