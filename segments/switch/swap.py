"""Phase 3b: make the next model's vectors the live `embedding` column, in one short locked step.

`swap()` (each switch's swap migration, run by `manage.py embedding_switch swap`) refuses, changing
nothing, unless the HNSW index on the next column is valid and nothing pending is quarantined.
Then, in one transaction:

1. `LOCK TABLE segments IN EXCLUSIVE MODE`, under lock_timeout: the application's writes wait,
   its reads go on. What is still pending is counted: with a follower running
   (`backfill_embeddings --follow`), the few segments it has not embedded yet are left to it (it
   embeds them into the renamed column a moment later); without one, they are embedded here, with
   the model the command loaded beforehand, when they are few enough to take no longer than the
   lock budget (`SwapInputs.catch_up`). Either way, more than allowed makes the swap give up,
   changing nothing, saying how many rows it was racing.
2. `ACCESS EXCLUSIVE` for the renames: `embedding` -> `embedding_legacy`, the next column ->
   `embedding`, their indexes (`segments_<column>_...` names follow their column), their entries
   in the model ledger, the staleness trigger (which from now on also clears the legacy vector of
   an edited text, so an undo never serves a stale one), and the views that select `embedding`,
   created again so that they serve the new column (a view binds its columns by position, and
   would otherwise go on serving the legacy vectors).

The undo (`unswap`) is the same in reverse. Both report how long they held their locks. The
columns are a `Columns`, given by the migration (segments.operations.SwapEmbedding); what the
operator's command adds (the catch-up, the follower's allowance, the record to fill) comes as
`SwapInputs`.
"""
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from django.core.management.base import CommandError
from django.db import connections

from askdrchaffee.postgres import index_valid, quote_ident
from embeddings import ledger
from segments import triggers
from segments.schema import FIRST_NEXT, LIVE, PREVIOUS, TABLE, blank_sql, embedding_schema, pending_sql
from segments.switch import catalog

logger = logging.getLogger(__name__)


class SwapRefused(CommandError):
    """The swap found work left to do; nothing was changed."""


class SwapRaced(SwapRefused):
    """More segments arrived than may be left pending (or embedded) under the lock."""

    def __init__(self, message, pending):
        super().__init__(message)
        self.pending = pending


@dataclass(frozen=True)
class Columns:
    """The columns one switch swaps: its next model's column (`embedding_384` in the first switch,
    `embedding_next` in later ones) into `embedding`, and `embedding` into `embedding_legacy`."""

    next: str
    live: str = LIVE
    previous: str = PREVIOUS

    @property
    def expanded_trigger(self):
        """The columns the staleness trigger clears before the swap (and after an undo): the first
        switch leaves the original project's column to its own writer; later ones keep both."""
        return (self.next,) if self.next == FIRST_NEXT else (self.live, self.next)

    @property
    def swapped_trigger(self):
        return (self.live, self.previous)

    def index(self, column, kind):
        """The project's name of `column`'s index of `kind` (hnsw, todo)."""
        return f"segments_{column}_{kind}"


@dataclass
class CatchUp:
    """What the swap may do under its lock without a follower: embed up to `max_rows` pending
    segments with `encoder`."""

    encoder: object
    max_rows: int


@dataclass
class SwapRecord:
    """What the last swap or undo did, for the command's report."""

    writes_blocked_ms: float = 0.0  # EXCLUSIVE or stronger held: the application's writes waited
    reads_blocked_ms: float = 0.0  # ACCESS EXCLUSIVE held: its reads waited too
    embedded_under_lock: int = 0
    left_to_follower: int = 0  # segments pending at the swap, which a running follower embeds
    views_recreated: list = field(default_factory=list)
    indexes_renamed: dict = field(default_factory=dict)  # name before: name after


@dataclass
class SwapInputs:
    """What the operator's command gives the swap: `catch_up` (embed late rows under the lock), or
    `allow_pending` (rows a running follower will embed), and the record to fill."""

    catch_up: CatchUp | None = None
    allow_pending: int = 0
    record: SwapRecord = field(default_factory=SwapRecord)


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


def refusal(using="default"):
    """Why the swap would be refused now, or None if it would be accepted (pending rows that
    are not quarantined are not a reason: the swap, or a follower, embeds them)."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT to_regclass('segments') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return "There is no segments table: run `manage.py migrate`."
        schema = embedding_schema(cursor=cursor)
        if schema.phase != "expanded":
            return f"The table is in phase {schema.phase}: the swap applies to the expanded phase only."
        columns = Columns(schema.vector_column)
        _missing, quarantined = missing_vectors(cursor, columns.next)
        valid = index_valid(cursor, columns.index(columns.next, "hnsw"))
    if quarantined:
        return (f"{quarantined} segment(s) with text are quarantined (the model could not embed them): "
                "`manage.py embedding_quarantine` lists them; fix or retry them with "
                "`manage.py backfill_embeddings --retry-quarantined`.")
    if valid is not True:
        state = "INVALID" if valid is False else "missing"
        return f"The HNSW index {columns.index(columns.next, 'hnsw')} is {state}: run `manage.py embedding_switch index`."
    return None


def check_ready(cursor, columns, inputs):
    """SwapRefused unless the swap can go ahead; SwapRaced when more rows are pending than it may
    embed (`inputs.catch_up`) or leave to a follower (`inputs.allow_pending`). The pending count."""
    missing, quarantined = missing_vectors(cursor, columns.next)
    if quarantined:
        raise SwapRefused(
            f"Swap refused, nothing changed: {quarantined} segment(s) with text are quarantined "
            "(`manage.py embedding_quarantine` lists them; `manage.py backfill_embeddings "
            "--retry-quarantined` tries them again)."
        )
    allowed = inputs.catch_up.max_rows if inputs.catch_up else inputs.allow_pending
    if missing > allowed:
        if inputs.catch_up is not None or inputs.allow_pending:
            what = "embedded under the lock" if inputs.catch_up else "left to the running follower"
            raise SwapRaced(
                f"Swap gave up, nothing changed: {missing} segment(s) arrived or changed since the last "
                f"backfill pass, more than can be {what} ({allowed}).", missing)
        raise SwapRefused(
            f"Swap refused, nothing changed: {missing} segment(s) with text have no vector of the new model "
            "yet. Run `manage.py embedding_switch swap`: it embeds them first."
        )
    if index_valid(cursor, columns.index(columns.next, "hnsw")) is not True:
        raise SwapRefused(
            f"Swap refused, nothing changed: the HNSW index {columns.index(columns.next, 'hnsw')} is missing or "
            "INVALID. Run `manage.py embedding_switch index` first."
        )
    return missing


def _embed_pending(schema_editor, columns, catch_up):
    """Embed the pending segments inside the swap's transaction (the table is locked against
    writes); returns how many. Any segment the model cannot embed refuses the swap."""
    from embeddings.writer import VectorWriter
    from segments.switch.backfill.encode import encode_texts
    from segments.switch.user_triggers import quiet_user_triggers

    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT s.id, s.text, md5(s.text)::uuid FROM segments s WHERE {pending_sql(columns.next)} "
                       "ORDER BY s.id")
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
    with schema_editor.connection.cursor() as cursor:
        quiet_user_triggers(cursor)  # for this transaction, which the renames follow
    writer = VectorWriter(schema_editor.connection, columns.next, dims,
                          identity=ledger.identity_of(catch_up.encoder))
    written = writer.write(list(ids), list(md5s), np.stack(vectors))
    if writer.column != columns.next:
        raise SwapRefused(f"Swap refused, nothing changed: the model loaded for the catch-up writes "
                          f"segments.{writer.column}, not segments.{columns.next}.")
    return written


def _views_on(cursor, column):
    """The views selecting segments.`column`, which must be created again after the rename.
    SwapRefused, before anything changes, for those that cannot be."""
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


def _renamed_indexes(cursor, moves):
    """{index name: its name after the step} for the indexes of the moving columns ({column: the
    column's next name}), in an order with no clash. An index named `segments_<column>_<kind>`
    belongs to that column (the longest column name that fits: `segments_embedding_384_todo` is
    embedding_384's, though its key is `id`) and follows it; any other index keeps its name."""
    columns = sorted({column for move in moves for column in move}, key=len, reverse=True)
    cursor.execute("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                   "WHERE i.indrelid = to_regclass(%s)", [TABLE])
    names = [name for (name,) in cursor.fetchall()]
    renames = {}
    for old, new in moves:
        for name in names:
            owner = next((column for column in columns if name.startswith(f"segments_{column}_")), None)
            if owner == old:
                renames[name] = f"segments_{new}_{name[len(f'segments_{old}_'):]}"[:63]
    return renames


def _locked_steps(schema_editor, columns, inputs, *, moves, trigger_columns, forward):
    """The swap or its undo, under EXCLUSIVE then ACCESS EXCLUSIVE; fills `inputs.record`."""
    record = inputs.record
    with schema_editor.connection.cursor() as cursor:
        views = _views_on(cursor, moves[0][0])
    schema_editor.execute("LOCK TABLE segments IN EXCLUSIVE MODE")
    writes_from = time.perf_counter()
    if forward:
        with schema_editor.connection.cursor() as cursor:
            pending = check_ready(cursor, columns, inputs)
        if inputs.catch_up is not None:
            record.embedded_under_lock = _embed_pending(schema_editor, columns, inputs.catch_up)
            with schema_editor.connection.cursor() as cursor:
                check_ready(cursor, columns, SwapInputs())  # again: under this lock no writer adds a row
        else:
            record.left_to_follower = pending
    schema_editor.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
    reads_from = time.perf_counter()
    with schema_editor.connection.cursor() as cursor:
        index_renames = _renamed_indexes(cursor, moves)
        for view in views:
            cursor.execute(f"DROP VIEW {view.name}")
        for old, new in moves:
            cursor.execute(f"ALTER TABLE segments RENAME COLUMN {quote_ident(old)} TO {quote_ident(new)}")
        for old, new in index_renames.items():
            cursor.execute(f"ALTER INDEX {quote_ident(old)} RENAME TO {quote_ident(new)}")
        ledger.rename(cursor, TABLE, dict(moves))
        cursor.execute(triggers.create_sql(*trigger_columns))
        for view in views:
            for statement in catalog.recreate_view_sql(view):
                cursor.execute(statement)
    record.views_recreated = [view.name for view in views]
    record.indexes_renamed = index_renames
    done = time.perf_counter()
    # The commit follows at once (the migration is atomic); the command adds its time.
    record.writes_blocked_ms = (done - writes_from) * 1000
    record.reads_blocked_ms = (done - reads_from) * 1000
    logger.info("segments swap: writes blocked %.1f ms, reads blocked %.1f ms before commit",
                record.writes_blocked_ms, record.reads_blocked_ms)
    return record


def swap(schema_editor, columns, inputs=None):
    """The next column becomes `embedding`, `embedding` becomes `embedding_legacy`."""
    inputs = inputs or SwapInputs()
    with schema_editor.connection.cursor() as cursor:
        check_ready(cursor, columns, inputs)
    _locked_steps(schema_editor, columns, inputs, forward=True, trigger_columns=columns.swapped_trigger,
                  moves=[(columns.live, columns.previous), (columns.next, columns.live)])
    _log_event(schema_editor, "swap", inputs.record)


def unswap(schema_editor, columns, inputs=None):
    """The undo: `embedding` becomes the next column again, `embedding_legacy` becomes `embedding`."""
    inputs = inputs or SwapInputs()
    _locked_steps(schema_editor, columns, inputs, forward=False, trigger_columns=columns.expanded_trigger,
                  moves=[(columns.live, columns.next), (columns.previous, columns.live)])
    _log_event(schema_editor, "undo", inputs.record)


def _log_event(schema_editor, step, record):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("INSERT INTO segments_switch_event (step, at, details) VALUES (%s, now(), %s)",
                       [step, json.dumps(asdict(record))])


def legacy_vectors_lacking(cursor):
    """Segments with text whose legacy vector is missing (cleared by an edit after the swap, or
    inserted after it): what an undo of the swap would not serve."""
    cursor.execute(f"SELECT count(*) FROM segments s WHERE s.{PREVIOUS} IS NULL AND NOT ({blank_sql()})")
    return cursor.fetchone()[0]
