"""Phase 3b: make the next model's vectors the live `embedding` column, in one short locked step.

`swap()` (each switch's swap migration, run by `manage.py embedding_switch swap`) refuses, changing
nothing, unless the HNSW index on the next column is valid and nothing pending is quarantined.
Then, in one transaction sent to the server as ONE message (askdrchaffee/round_trips.py), so that
from taking the table's lock to the commit no client round trip is waited for and the
application's wait does not depend on where the operator sits:

1. `LOCK TABLE segments IN EXCLUSIVE MODE`, under a short lock_timeout (askdrchaffee.postgres.
   with_lock_retries tries again): the application's writes wait, its reads go on. On the server,
   a check: nothing pending is quarantined, the HNSW index is valid, the catalogue (the table's
   indexes, the views on it) is what the message was written for, and at most `allow_pending`
   segments wait for a vector: a running follower (`backfill_embeddings --follow`) embeds them
   into the renamed column a moment later; without one, the command that ran the swap embeds
   them right after the commit, with the model it loaded beforehand (steps.swap): as many as that
   model embeds in steps.SWAP_LEFT_SECONDS. More than allowed makes the swap give up, changing nothing,
   saying how many rows it was racing (SwapRaced).
2. `ACCESS EXCLUSIVE` for the renames: `embedding` -> `embedding_legacy`, the next column ->
   `embedding`, their indexes (`segments_<column>_...` names follow their column), their entries
   in the model ledger, the staleness trigger (which from now on also clears the legacy vector of
   an edited text, so an undo never serves a stale one), and the views that select `embedding`,
   created again so that they serve the new column (a view binds its columns by position, and
   would otherwise go on serving the legacy vectors).
3. The step's record (a SwitchEvent, and for the operator's command the migration's row in
   django_migrations), with how long the server held the writes and the reads: the server's own
   clock, from each lock to the record, just before the commit.

The undo (`unswap`) is the same in reverse. The columns are a `Columns`, given by the migration
(segments.operations.SwapEmbedding); what the operator's command adds (the allowance, the record
to fill) comes as `SwapInputs`.
"""
import json
import logging
from dataclasses import dataclass, field

from django.core.management.base import CommandError
from django.db import connections

from askdrchaffee.postgres import index_valid, quote_ident, quote_literal
from askdrchaffee.round_trips import message
from embeddings import ledger
from segments import triggers
from segments.schema import FIRST_NEXT, LIVE, PREVIOUS, TABLE, blank_sql, embedding_schema, pending_sql
from segments.switch import catalog

logger = logging.getLogger(__name__)


class SwapRefused(CommandError):
    """The swap found work left to do; nothing was changed."""


class SwapRaced(SwapRefused):
    """More segments arrived than the swap may leave pending (to a follower, or to the command after its commit)."""

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
class SwapRecord:
    """What the last swap or undo did, for the command's report."""

    writes_blocked_ms: float = 0.0  # EXCLUSIVE or stronger held, by the server's clock: the application's writes waited
    reads_blocked_ms: float = 0.0  # ACCESS EXCLUSIVE held: its reads waited too
    left_pending: int = 0  # segments pending at the swap, left to a running follower or to the command
    embedded_after: int = 0  # of those, embedded by the command right after the commit (no follower running)
    views_recreated: list = field(default_factory=list)
    indexes_renamed: dict = field(default_factory=dict)  # name before: name after
    event_id: int | None = None  # its SwitchEvent


@dataclass
class SwapInputs:
    """What the operator's command gives the swap: `allow_pending` (rows a running follower, or the
    command right after the commit, will embed), the lock_timeout of this attempt, the migration
    to record with it (app, name), and the record to fill."""

    allow_pending: int = 0
    lock_timeout: str | None = None
    migration: tuple | None = None
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


def check_ready(cursor, columns, allow_pending=0):
    """SwapRefused unless the swap can go ahead now (read before any lock: the locked message checks
    again); SwapRaced when more rows are pending than `allow_pending`. The pending count."""
    missing, quarantined = missing_vectors(cursor, columns.next)
    if quarantined:
        raise SwapRefused(QUARANTINED.format(quarantined))
    if missing > allow_pending and not allow_pending:
        raise SwapRefused(f"Swap refused, nothing changed: {missing} segment(s) with text have no vector of the new "
                          "model yet. Run `manage.py embedding_switch swap`: it embeds them first.")
    if missing > allow_pending:
        raise SwapRaced(RACED.format(missing, allow_pending), missing)
    if index_valid(cursor, columns.index(columns.next, "hnsw")) is not True:
        raise SwapRefused(INDEX_MISSING.format(columns.index(columns.next, "hnsw")))
    return missing


QUARANTINED = ("Swap refused, nothing changed: {} segment(s) with text are quarantined (`manage.py "
               "embedding_quarantine` lists them; `manage.py backfill_embeddings --retry-quarantined` tries them again).")
RACED = ("Swap gave up, nothing changed: {} segment(s) arrived or changed since the last backfill pass, more than "
         "can be left to a follower or embedded right after the swap ({}).")
INDEX_MISSING = ("Swap refused, nothing changed: the HNSW index {} is missing or INVALID. Run `manage.py "
                 "embedding_switch index` first.")
CATALOG_MOVED = "segments swap: the catalogue changed"


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


# What the locked message checks the catalogue against: the table's indexes, and the views on it with
# their definitions (a view or an index made meanwhile changes it; the message is then written again).
CATALOG_FINGERPRINT = f"""
    SELECT md5(coalesce((SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_index i
                         JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass('{TABLE}')), '')
               || '|' || coalesce((SELECT string_agg(v.oid::text || ':' || md5(pg_get_viewdef(v.oid)), ','
                                                     ORDER BY v.oid)
                                   FROM (SELECT DISTINCT r.ev_class AS oid FROM pg_depend d
                                         JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
                                         WHERE d.refobjid = to_regclass('{TABLE}') AND r.ev_class <> d.refobjid) v), ''))
"""


@dataclass
class LockedStep:
    """The swap or its undo, written as the one message that runs it (`sql`), with what it will do."""

    sql: str
    views: list
    index_renames: dict


def locked_step(cursor, columns, inputs, *, forward):
    """The LockedStep of the swap (`forward`) or its undo, read from the catalogue now (before any lock)."""
    moves = [(columns.live, columns.previous), (columns.next, columns.live)] if forward else \
        [(columns.live, columns.next), (columns.previous, columns.live)]
    views = _views_on(cursor, moves[0][0])
    index_renames = _renamed_indexes(cursor, moves)
    cursor.execute(CATALOG_FINGERPRINT)
    fingerprint = cursor.fetchone()[0]
    trigger_columns = columns.swapped_trigger if forward else columns.expanded_trigger
    step = "swap" if forward else "undo"
    statements = [
        # this attempt's lock_timeout (with_lock_retries); in a migration's transaction, the executor's
        f"SELECT set_config('lock_timeout', {quote_literal(inputs.lock_timeout)}, true)" if inputs.lock_timeout else "",
        f"LOCK TABLE {TABLE} IN EXCLUSIVE MODE",
        "SELECT set_config('segments.writes_held_from', clock_timestamp()::text, true)",
        _check_sql(columns, inputs.allow_pending, fingerprint, forward),
        f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE",
        "SELECT set_config('segments.reads_held_from', clock_timestamp()::text, true)",
        *(f"DROP VIEW {view.name}" for view in views),
        *(f"ALTER TABLE {TABLE} RENAME COLUMN {quote_ident(old)} TO {quote_ident(new)}" for old, new in moves),
        *(f"ALTER INDEX {quote_ident(old)} RENAME TO {quote_ident(new)}" for old, new in index_renames.items()),
        _mogrified(cursor, *ledger.rename_statement(TABLE, dict(moves))),
        triggers.create_sql(*trigger_columns),
        *(statement for view in views for statement in catalog.recreate_view_sql(view)),
        *_migration_record(inputs.migration, forward),
        _event_sql(step, views, index_renames),
    ]
    return LockedStep(message(*statements), views, index_renames)


def _mogrified(cursor, sql, params):
    return cursor.mogrify(sql, params).decode()


def _check_sql(columns, allow_pending, fingerprint, forward):
    """The server's own check, under the EXCLUSIVE lock: the catalogue unchanged and, for the swap,
    nothing pending quarantined, the HNSW index valid, at most `allow_pending` pending (SwapRaced)."""
    swap_checks = f"""
    SELECT count(*), count(q.segment_id) INTO pending, quarantined FROM {TABLE} s
        LEFT JOIN embeddings_quarantine q ON q.segment_id = s.id WHERE {pending_sql(columns.next)};
    IF quarantined > 0 THEN
        RAISE EXCEPTION 'segments swap: quarantined' USING DETAIL = quarantined::text;
    END IF;
    IF NOT coalesce((SELECT indisvalid FROM pg_index WHERE indexrelid =
                     to_regclass({quote_literal(columns.index(columns.next, 'hnsw'))})), false) THEN
        RAISE EXCEPTION 'segments swap: index';
    END IF;
    IF pending > {int(allow_pending)} THEN
        RAISE EXCEPTION 'segments swap: raced' USING DETAIL = pending::text;
    END IF;""" if forward else ""
    return f"""DO $check$ DECLARE pending bigint := 0; quarantined bigint := 0; BEGIN
    IF ({CATALOG_FINGERPRINT.strip()}) <> {quote_literal(fingerprint)} THEN
        RAISE EXCEPTION '{CATALOG_MOVED}';
    END IF;{swap_checks}
    PERFORM set_config('segments.left_pending', pending::text, true);
END $check$"""


def _migration_record(migration, forward):
    """The migration's row in django_migrations, written (or, for the undo, deleted) with the step."""
    if migration is None:
        return []
    app, name = (quote_literal(part) for part in migration)
    if forward:
        return [f"INSERT INTO django_migrations (app, name, applied) VALUES ({app}, {name}, now())"]
    return [f"DELETE FROM django_migrations WHERE app = {app} AND name = {name}"]


def _event_sql(step, views, index_renames):
    """The step's SwitchEvent, with the server's measure of the locks held, answered as the message's rows."""
    held = "round((extract(epoch FROM clock_timestamp() - current_setting('segments.{}_held_from')::timestamptz) * 1000)::numeric, 1)"
    return f"""
        INSERT INTO segments_switch_event (step, at, details) VALUES ({quote_literal(step)}, now(), jsonb_build_object(
            'writes_blocked_ms', {held.format('writes')}, 'reads_blocked_ms', {held.format('reads')},
            'writes_held_from', current_setting('segments.writes_held_from'),
            'left_pending', current_setting('segments.left_pending')::bigint,
            'views_recreated', {quote_literal(json.dumps([view.name for view in views]))}::jsonb,
            'indexes_renamed', {quote_literal(json.dumps(index_renames))}::jsonb))
        RETURNING id, details"""


def run_locked(connection, columns, inputs, *, forward):
    """The swap (`forward`) or its undo as one message on `connection` (a Django connection or a psycopg2
    one: in autocommit, its own transaction, committed by the server at its end; in the caller's
    transaction, a part of it); fills `inputs.record`. SwapRefused or SwapRaced from the server's check,
    CatalogMoved when the catalogue changed between the reads and the lock (write it again)."""
    with connection.cursor() as cursor:
        step = locked_step(cursor, columns, inputs, forward=forward)
        try:
            cursor.execute(step.sql)
        except Exception as exc:
            raise _refusal(exc, columns) or exc
        event_id, details = cursor.fetchone()
    details = json.loads(details) if isinstance(details, str) else details
    record = inputs.record
    record.writes_blocked_ms, record.reads_blocked_ms = details["writes_blocked_ms"], details["reads_blocked_ms"]
    record.left_pending = details["left_pending"]
    record.views_recreated, record.indexes_renamed = [view.name for view in step.views], step.index_renames
    record.event_id = event_id
    logger.info("segments %s: writes blocked %.1f ms, reads blocked %.1f ms (the server's clock)",
                "swap" if forward else "undo", record.writes_blocked_ms, record.reads_blocked_ms)
    return record


class CatalogMoved(SwapRefused):
    """An index or a view on segments changed between the message's writing and its lock: write it again."""


def _refusal(exc, columns):
    """The SwapRefused (or SwapRaced, CatalogMoved) that the server's check raised as `exc`, else None."""
    cause = getattr(exc, "__cause__", None) if getattr(exc, "diag", None) is None else exc
    diag = getattr(cause, "diag", None)
    text, detail = getattr(diag, "message_primary", None), getattr(diag, "message_detail", None)
    if text == "segments swap: quarantined":
        return SwapRefused(QUARANTINED.format(detail))
    if text == "segments swap: index":
        return SwapRefused(INDEX_MISSING.format(columns.index(columns.next, "hnsw")))
    if text == "segments swap: raced":
        return SwapRaced(RACED.format(detail, "its allowance"), int(detail))
    if text == CATALOG_MOVED:
        return CatalogMoved("Swap gave up, nothing changed: an index or a view on segments changed meanwhile.")
    return None


def swap(schema_editor, columns, inputs=None):
    """The next column becomes `embedding`, `embedding` becomes `embedding_legacy` (Django's migration
    path: in the migration's transaction, which Django records and commits)."""
    inputs = inputs or SwapInputs()
    with schema_editor.connection.cursor() as cursor:
        check_ready(cursor, columns, inputs.allow_pending)
    run_locked(schema_editor.connection, columns, inputs, forward=True)


def unswap(schema_editor, columns, inputs=None):
    """The undo: `embedding` becomes the next column again, `embedding_legacy` becomes `embedding`."""
    run_locked(schema_editor.connection, columns, inputs or SwapInputs(), forward=False)


def legacy_vectors_lacking(cursor):
    """Segments with text whose legacy vector is missing (cleared by an edit after the swap, or
    inserted after it): what an undo of the swap would not serve."""
    cursor.execute(f"SELECT count(*) FROM segments s WHERE s.{PREVIOUS} IS NULL AND NOT ({blank_sql()})")
    return cursor.fetchone()[0]
