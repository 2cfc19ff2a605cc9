"""Phase 4, the contract: give the legacy vectors' disk space back, online, then drop the column.

`ALTER TABLE ... DROP COLUMN` frees nothing on disk: the 1536-dim vectors (about 6 kB a row, in
TOAST) stay until every row is rewritten, and `VACUUM FULL` rewrites the table under an ACCESS
EXCLUSIVE lock for the whole rewrite. A plain VACUUM gives pages back only from the end of each
file, so `run()` also sees to it that nothing live is left there:

1. drops the legacy vector indexes with `DROP INDEX CONCURRENTLY` (no query used them after the
   swap, and they make every clearing write dearer), then VACUUMs, so that the free space the
   backfill left at the start of the table is known and used first;
2. sets `embedding_legacy` to NULL, one short transaction per batch of at most `rows_per_transaction`
   rows, in id order but never two rows of one page in one transaction: a row rewritten after
   the page has lost one of its rows fits in the freed space (a HOT update: no index entry, no
   growth), so the table does not grow by another copy of itself. The application's triggers
   do not fire (segments/switch/user_triggers.py);
3. VACUUMs (the legacy chunks become free space, lowest pages first), then rewrites each value
   still stored out of line (the new vectors of longer segments, long texts) so that it moves
   to the front of the TOAST table (segments/switch/out_of_line.py), and VACUUMs again, which
   truncates the TOAST table and the heap after their last live page (ACCESS EXCLUSIVE only for
   the moment of the truncation, and only if it can have it at once). The rewrite needs room at
   the front: it is skipped when the values still out of line fill over half the TOAST table
   (replaced vectors that were held in the rows, as a 384-dim halfvec is, freed none there), as
   it would then add a copy of them at its end;
4. drops the column (migration 0008: ACCESS EXCLUSIVE for milliseconds, under lock_timeout).

Steps 2 and 3 yield to the database's health: before each transaction the contract's Throttle
(segments/switch/throttle.py) holds it back while an operator has paused the switch
(`embedding_switch pause`), while a streaming replica lags more than BACKFILL_MAX_REPLICA_LAG
seconds (or --max-replica-lag), and under --max-rows-per-second; it says when it waits and why.

Steps 1-3 can be interrupted and run again: they resume with what is left. From step 1 on the
swap can no longer be undone: `embedding_switch contract` asks for an explicit confirmation
first, and records that it started, so that an undo is refused. A transaction or query that
stays open meanwhile (in the same database) keeps the row versions it can see from being freed:
rows then move instead of being rewritten in place. So each VACUUM of step 3 first waits (up to
WAIT_FOR_OLDER_TRANSACTIONS_SECONDS) for the transactions older than the contract's last write,
naming them (segments/switch/horizon.py); one still open after that is reported in the result
(`held_back_by`), and the space it holds comes back at a VACUUM after it ends.
"""
import json
import time
from dataclasses import dataclass

from django.core.management.base import CommandError
from psycopg2 import errors

from askdrchaffee import postgres, round_trips
from segments.schema import PREVIOUS as LEGACY
from segments.schema import TABLE
from segments.switch import catalog, out_of_line, server_loop
from segments.switch.swap import SwapRefused
from segments.switch.user_triggers import triggers_to_quiet, user_triggers_query

# Rows a clearing or moving transaction looks at; it writes at most this many, and an application
# write to one of them waits for it (a few ms a row where the row moves to another page).
DEFAULT_ROWS_PER_TRANSACTION = 100
LOCK_TIMEOUT = "5s"  # a batch waiting behind an application transaction gives up, then retries
LOCK_ATTEMPTS = 5
# How long each VACUUM waits for the transactions older than the contract's writes (horizon.py).
WAIT_FOR_OLDER_TRANSACTIONS_SECONDS = 300

# Bytes on disk of segments' heap, its TOAST table (with its index), its indexes, and all of them together
# (with the heap's free space and visibility maps).
RELATION_SIZES = f"""
    SELECT pg_relation_size(c.oid) AS heap_bytes,
           COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) AS toast_bytes,
           pg_indexes_size(c.oid) AS indexes_bytes, pg_total_relation_size(c.oid) AS total_bytes
    FROM pg_class c WHERE c.oid = to_regclass('{TABLE}')
"""
SIZE_KEYS = ("heap_bytes", "toast_bytes", "indexes_bytes", "total_bytes")


class ContractRefused(SwapRefused):
    """The contract cannot start now; nothing was changed."""


class ContractInterrupted(CommandError):
    """A batch kept waiting behind the application's locks; what was done stays done."""


def refuse_dependent_views(cursor, rows=None):
    """ContractRefused naming the views that still select the legacy column (`rows`: those of
    catalog.dependent_views_query(), read already)."""
    if rows is None:
        cursor.execute(*catalog.dependent_views_query(LEGACY))
        rows = cursor.fetchall()
    if rows:
        names = ", ".join(f"{name} ({kind})" for _oid, name, kind, *_ in rows)
        raise ContractRefused(
            f"Contract refused, nothing changed: {names} select(s) segments.{LEGACY}, which the contract "
            "drops. Redefine them without that column (or drop them), then run the contract again."
        )


def drop_legacy_indexes(link, out, indexes=None):
    """DROP INDEX CONCURRENTLY each vector index on the legacy column (`indexes`: catalog.Index, read
    already), on `link` (a server_loop.ServerLink); their names. (It waits for the transactions using the
    table at the time, blocking none; one left INVALID by an interrupted drop is dropped by the next run.)"""
    if indexes is None:
        indexes = link.run(lambda cursor: catalog.column_indexes(cursor, LEGACY))
    indexes = [index.name for index in indexes if index.method != "btree"]
    for name in indexes:
        out(f"dropping the legacy index {name} (CONCURRENTLY)")
        patiently(link, f"DROP INDEX CONCURRENTLY IF EXISTS {postgres.quote_ident(name)}")
    return indexes


def transaction_settings(cursor, trigger_rows=None):
    """What each of the contract's own transactions sets for itself (read once per run): lock_timeout,
    and session_replication_role = replica where the application's triggers would fire on its writes
    (TriggersNotQuieted, naming the GRANT, when the role may not set it). `trigger_rows`: those of
    user_triggers_query(), read already."""
    values = {"lock_timeout": LOCK_TIMEOUT}
    if triggers_to_quiet(cursor, trigger_rows):
        values["session_replication_role"] = "replica"
    return values


def patiently(link, statement):
    """`statement` on `link`, outside any transaction (VACUUM, CONCURRENTLY), no deadline; after a lock
    timeout or a deadlock, again (LOCK_ATTEMPTS times in all), then ContractInterrupted."""
    retrying = postgres.retrying(attempts=LOCK_ATTEMPTS, wait=lambda attempt: 0.1 * attempt,
                                 on=(errors.LockNotAvailable, errors.DeadlockDetected), what="the contract")
    try:
        return retrying(link.run, lambda cursor: cursor.execute(statement), server_loop.PATIENT)
    except (errors.LockNotAvailable, errors.DeadlockDetected):
        raise interrupted() from None


def interrupted():
    return ContractInterrupted(
        f"The contract stopped: it waited for the application's transactions {LOCK_ATTEMPTS} times "
        f"({LOCK_TIMEOUT} each). What it did stays done; run `manage.py embedding_switch contract "
        "--confirm` again when no transaction stays open on segments (a smaller --rows-per-transaction "
        "makes each of its own transactions shorter)."
    )


def clear_statement(rows_per_transaction):
    """One clearing transaction, for the server's loop (server_loop.batches): among the next
    `rows_per_transaction` legacy vectors after id $1, the first of each page set to NULL; its answer
    (rows cleared, the id to go on after: before the first candidate it left, else its last; NULL when
    none was left)."""
    return f"""
        WITH candidates AS (SELECT id, (ctid::text::point)[0] AS page FROM {TABLE}
                            WHERE id > $1 AND {LEGACY} IS NOT NULL ORDER BY id LIMIT {int(rows_per_transaction)}),
             chosen AS (SELECT DISTINCT ON (page) id FROM candidates ORDER BY page, id),
             cleared AS (UPDATE {TABLE} s SET {LEGACY} = NULL FROM chosen
                         WHERE s.id = chosen.id AND s.{LEGACY} IS NOT NULL RETURNING s.id)
        SELECT (SELECT count(*) FROM cleared),
               CASE WHEN NOT EXISTS (SELECT 1 FROM candidates) THEN NULL
                    ELSE coalesce((SELECT min(c.id) - 1 FROM candidates c WHERE c.id NOT IN (SELECT id FROM chosen)),
                                  (SELECT max(id) FROM candidates)) END
    """


def clear_legacy_vectors(link, rows_per_transaction, local, progress=None, throttle=None):
    """Set the legacy column to NULL, a batch a transaction (each setting `local`), in the server's loop;
    a server_loop.Done (how many rows were cleared, when its last write ended by the server's clock, who
    could still see the cleared rows then). Before each call of
    the loop `throttle` (segments/switch/throttle.py), when given, may hold it back; with a rate cap, a
    call clears at most a second of it."""
    return _on_the_server(link, clear_statement(rows_per_transaction), local, progress, throttle,
                          rows_per_transaction)


def _on_the_server(link, statement, local, progress, throttle, rows_per_transaction, first=None):
    cap = getattr(throttle, "max_rows_per_second", None)
    most = max(rows_per_transaction, int(cap * server_loop.SECONDS_PER_CALL)) if cap else None
    hold = (lambda rows: throttle.before_write(rows)) if throttle is not None else None
    try:
        return server_loop.batches(link, statement, local=local, on_batches=progress, before_call=hold, most=most,
                                   lock_attempts=LOCK_ATTEMPTS, look=throttle, first=first)
    except server_loop.LockBlocked:
        raise interrupted() from None


# The values still stored out of line are moved only when they fill at most this share of the TOAST
# table: the rest is free space at its front for their new copies.
MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST = 0.5


def found_query(rewrite):
    """The moving loop's look before its first batch (server_loop.batches' `first`): whether to move (values
    stored out of line that fill at most MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST of the TOAST table), and
    [the table's sizes by SIZE_KEYS..., rows holding values stored out of line, those values' bytes]."""
    return f"""
        SELECT o.rows > 0 AND o.stored <= {MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST} * s.toast_bytes,
               json_build_array({", ".join(f"s.{key}" for key in SIZE_KEYS)}, o.rows, o.stored)
        FROM ({RELATION_SIZES}) s, ({rewrite.stored_query()}) AS o(rows, stored)
    """


def table_sizes(cursor):
    """RELATION_SIZES, by SIZE_KEYS."""
    cursor.execute(RELATION_SIZES)
    return dict(zip(SIZE_KEYS, cursor.fetchone()))


def move_out_of_line_values(link, rewrite, rows_per_transaction, local, progress_factory=None, out=print,
                            throttle=None, found=lambda sizes: None):
    """Rewrite the values stored out of line (`rewrite`: an out_of_line.Rewrite) when they fill at most
    MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST of the TOAST table, `rows_per_transaction` rows a transaction (each
    setting `local`), in the server's loop, so that they move to the front of the TOAST table. The loop's
    first call looks first (found_query(): no round trip of its own); `found(sizes)` hears the table's sizes
    then. A server_loop.Done (how many rows were rewritten: 0 without room to move them into; when the last
    write ended by the server's clock and who could still see it then: None without one)."""
    statement = rewrite.batch_statement(rows_per_transaction)
    if statement is None:
        found(link.run(table_sizes))
        return server_loop.Done(0, None)
    bar = None

    def looked(value):
        nonlocal bar
        *sizes, rows, stored = value
        sizes = dict(zip(SIZE_KEYS, sizes))
        found(sizes)
        if rows and stored > MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST * sizes["toast_bytes"]:
            out(f"the values stored out of line fill {stored / max(sizes['toast_bytes'], 1):.0%} of the TOAST table: "
                "no room to move them to its front, left where they are")
        elif rows and progress_factory:
            bar = progress_factory(rows)
            if hasattr(bar, "set_description"):
                bar.set_description("moving out-of-line values")

    try:
        return _on_the_server(link, statement, local, lambda rows: bar.update(rows) if bar else None, throttle,
                              rows_per_transaction, first=(found_query(rewrite), looked))
    finally:
        if bar is not None:
            bar.close()


COUNT_LEGACY = f"SELECT count(*) FROM {TABLE} WHERE {LEGACY} IS NOT NULL"


def count_legacy_vectors(cursor):
    cursor.execute(COUNT_LEGACY)
    return cursor.fetchone()[0]


def vacuum_after_writes(link, out, wait_seconds, held_back, written, analyze=False):
    """vacuum() once the transactions that began before the contract's last write (`written`, a
    server_loop.Done: when, by the server's clock, and who could still see it then) have ended, or
    `wait_seconds` have passed: what still holds the space is recorded in `held_back`, {who: description}.
    The wait runs on the server, answering every WAIT_STEP_SECONDS with who it still waits for. Those it
    stopped waiting for (horizon.Holder), [] when none was left."""
    since, left = written.finished, written.holders
    deadline, said = time.monotonic() + wait_seconds, set()
    if left is None:  # the call that wrote last did not look: a look that answers at once
        left = server_loop.holders_after(link, since, 0.0)
    while True:
        for holder in left:
            if holder.who not in said:
                said.add(holder.who)
                out(f"waiting for {holder.line} to end: until it does, VACUUM cannot free what the contract cleared "
                    f"(waiting up to {int(wait_seconds)} s in all)")
        if not left or time.monotonic() >= deadline:
            break
        left = server_loop.holders_after(link, since, max(0.0, min(server_loop.WAIT_STEP_SECONDS,
                                                                   deadline - time.monotonic())))
    for holder in left:
        held_back[holder.who] = holder.line
    vacuum(link, analyze)
    return left


def vacuum(link, analyze=False):
    """Plain VACUUM of segments (outside a transaction; no lock that blocks reads or writes, but
    for the moment it truncates empty trailing pages, and only if it gets that lock at once).

    INDEX_CLEANUP ON: by default a VACUUM that finds dead rows on under 2% of a table's pages skips
    its index pass and leaves those rows' line pointers behind (PostgreSQL 14+), and a page that
    still holds one cannot be truncated. After the out-of-line values have moved, their old chunks
    are on just such a few pages, near the end of the TOAST table: the whole file would stay."""
    options = "ANALYZE, INDEX_CLEANUP ON, TRUNCATE" if analyze else "INDEX_CLEANUP ON, TRUNCATE"
    patiently(link, f"VACUUM ({options}) {TABLE}")


def raw_connection(using):
    """A psycopg2 connection of its own in autocommit mode (VACUUM and CONCURRENTLY need one), with
    lock_timeout as a startup option: over DATABASE_DIRECT_URL behind a pooler (askdrchaffee.postgres);
    the check of that setting goes with its first message."""
    return postgres.private_connection(using, "The contract", settings={"lock_timeout": LOCK_TIMEOUT},
                                       application_name="embedding_switch contract", checked=False)


def link_for(using):
    """The contract's ServerLink: raw connections (opened again after a lost or silent link), each
    creating the link's routines and checking its settings in its first message."""
    return server_loop.ServerLink(lambda: raw_connection(using))


def _megabytes(sizes):
    return (f"{sizes['total_bytes'] / 2**20:,.1f} MB (heap {sizes['heap_bytes'] / 2**20:,.1f}, "
            f"TOAST {sizes['toast_bytes'] / 2**20:,.1f}, indexes {sizes['indexes_bytes'] / 2**20:,.1f})")


@dataclass
class Prepared:
    """What the contract reads before it changes anything (prepare(), one message)."""

    local: dict  # what each of its transactions sets for itself (transaction_settings)
    sizes: dict  # RELATION_SIZES, by SIZE_KEYS
    to_clear: int  # legacy vectors
    legacy_indexes: list  # catalog.Index on the legacy column
    rewrite: out_of_line.Rewrite  # how its values stored out of line are found and moved
    applied: set  # the recorded migrations, (app, name): the contract's plan (gate.contract_plan)
    look: tuple = None  # the throttle's look, when asked for (Throttle.observe reads it)


APPLIED = "SELECT app, name FROM django_migrations"


def prepare(cursor, look=None):
    """The contract's look at the table, in one message, with the recorded migrations and, given `look` (a
    throttle's look_query_for_reads), the throttle's look (ContractRefused while a view selects the legacy column,
    TriggersNotQuieted when the application's triggers would fire and may not be kept quiet): a Prepared.
    Nothing is changed."""
    queries = [catalog.dependent_views_query(LEGACY), user_triggers_query(), RELATION_SIZES, COUNT_LEGACY,
               catalog.column_indexes_query(LEGACY), out_of_line.columns_query(), APPLIED]
    try:
        views, trigger_rows, (sizes,), ((to_clear,),), indexes, columns, applied, *looked = round_trips.reads(
            cursor, *queries, *([look] if look else []))
    except errors.UndefinedTable:  # the look's pause table, before its migration (the plan then says so)
        if not look:
            raise
        return prepare(cursor)
    refuse_dependent_views(cursor, views)
    return Prepared(transaction_settings(cursor, trigger_rows), dict(zip(SIZE_KEYS, sizes)), to_clear,
                    [catalog.Index(*row) for row in indexes], out_of_line.Rewrite(cursor, skip={LEGACY}, rows=columns),
                    {tuple(row) for row in applied}, looked[0][0] if looked else None)


def run(link, prepared, rows_per_transaction=DEFAULT_ROWS_PER_TRANSACTION, out=print, progress_factory=None,
        wait_seconds=None, throttle=None):
    """Steps 1-3 of the contract on `link` (link_for(); prepared: what prepare() read on it; the caller
    applies the contract migration after); returns its figures. `throttle` (segments/switch/throttle.py),
    when given, may hold each call of the server's clearing and moving loop back (a pause, a lagging
    replica, a rate cap)."""
    if wait_seconds is None:
        wait_seconds = WAIT_FOR_OLDER_TRANSACTIONS_SECONDS
    started, held_back, local = time.perf_counter(), {}, prepared.local
    sizes = {"start": prepared.sizes}
    dropped = drop_legacy_indexes(link, out, prepared.legacy_indexes)
    vacuum(link)
    out(f"clearing {prepared.to_clear:,} legacy vectors, at most {rows_per_transaction} a transaction")
    bar = progress_factory(prepared.to_clear) if progress_factory else None
    reconnects = link.reconnects
    try:
        clearing = clear_legacy_vectors(link, rows_per_transaction, local, bar.update if bar else None, throttle)
    finally:
        if bar is not None:
            bar.close()
    cleared = clearing.rows
    if link.reconnects != reconnects:  # a call whose answer a lost link took has cleared its rows too
        cleared = prepared.to_clear - link.run(count_legacy_vectors)
    left = vacuum_after_writes(link, out, wait_seconds, held_back, clearing)

    def found(cleared_sizes):
        sizes["cleared"] = cleared_sizes
        out(f"cleared {cleared:,} legacy vectors; segments is {_megabytes(cleared_sizes)}; "
            "moving the values stored out of line to the front of the TOAST table")

    moving = move_out_of_line_values(link, prepared.rewrite, rows_per_transaction, local, progress_factory, out,
                                     throttle, found)
    moved = moving.rows
    # nothing moved: the last writes are the clearing's, and who could see them is known since its VACUUM
    vacuum_after_writes(link, out, wait_seconds, held_back,
                        moving if moving.finished else server_loop.Done(0, clearing.finished, left), analyze=True)
    out(f"rewrote the out-of-line values of {moved:,} segments")
    if held_back:
        out(f"NOT all the space came back: {'; '.join(held_back.values())} still saw the cleared rows after "
            f"{wait_seconds} s. A VACUUM of segments after it ends (autovacuum runs one) frees them.")
    return {
        "legacy_indexes_dropped": dropped,
        "legacy_vectors_cleared": cleared,
        "out_of_line_rows_moved": moved,
        "size_before_contract_bytes": sizes["start"]["total_bytes"],
        "sizes": sizes,  # "after", with the drop: Record
        "held_back_by": list(held_back.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def drop_legacy_column(schema_editor):
    """A switch's contract migration (Django's path: in the migration's transaction): the trigger stops
    guarding the legacy column, its entry in the model ledger is retired (if the contract's clearing has
    not retired it already), and the column is dropped."""
    with schema_editor.connection.cursor() as cursor:
        refuse_dependent_views(cursor)
        cursor.execute(drop_statements(cursor))


class Record:
    """The contract's SwitchEvent, written by the drop's message: run()'s `figures`, with the table's sizes
    once the column is dropped (sizes.after, size_after_vacuum_bytes, total_bytes), its size before the switch
    began, and how long the message took on the server until then (drop_column_ms). `statement` writes it,
    `query` (a read of the same message, after it) reads it back for `written`; `details`: the event's,
    once written."""

    def __init__(self, figures):
        self.figures, self.details = figures, None

    def statement(self, cursor):
        from segments.models import SwitchEvent

        events = SwitchEvent._meta.db_table
        return cursor.mogrify(f"""
            INSERT INTO {events} (step, at, details)
            SELECT 'contract', now(), jsonb_set(%s::jsonb, '{{sizes,after}}', to_jsonb(s)) || jsonb_build_object(
                'drop_column_ms',
                round((extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::numeric, 1),
                'size_after_vacuum_bytes', s.total_bytes, 'total_bytes', s.total_bytes,
                'total_bytes_before_switch', (SELECT e.details->'total_bytes' FROM {events} e
                                              WHERE e.step = 'before' ORDER BY e.at DESC, e.id DESC LIMIT 1))
            FROM ({RELATION_SIZES}) s""", [json.dumps(self.figures, default=str)]).decode()

    @staticmethod
    def query():
        from segments.models import SwitchEvent

        events = SwitchEvent._meta.db_table
        return (f"SELECT details::text FROM {events} "
                f"WHERE id = currval(pg_get_serial_sequence({postgres.quote_literal(events)}, 'id'))")

    def written(self, rows):
        """From the answer of `query` (its rows)."""
        self.details = json.loads(rows[0][0])


def after_size_line(details):
    """The line that tells the table's size once the contract is done."""
    return f"dropped the legacy column; segments is {_megabytes(details['sizes']['after'])}"


def drop_statements(cursor, lock_timeout=None, migration=None, also_recorded=(), record=None, reads=()):
    """The contract migration's work as one message (the operator's path, segments/switch/gate.py): from
    the first lock to the commit no client round trip; with the migration's record ((app, name)) when
    given, and those of `also_recorded` (migrations with nothing to run that wait for it), the contract's
    SwitchEvent (`record`, a Record) when given; then, when there is a record or `reads` (queries), the
    commit and one statement of round_trips.reads: the record's query, then `reads`. A view made on the legacy column
    meanwhile stops it (DependentObjectsStillInUse: the drop has no CASCADE)."""
    from embeddings import ledger
    from segments import triggers
    from segments.schema import LIVE

    recorded = [] if migration is None else [  # planned before the contract began: each once
        "INSERT INTO django_migrations (app, name, applied) SELECT {0}, {1}, now() WHERE NOT EXISTS "
        "(SELECT 1 FROM django_migrations WHERE app = {0} AND name = {1})".format(
            *(postgres.quote_literal(part) for part in names)) for names in (migration, *also_recorded)]
    return round_trips.message(
        f"SELECT set_config('lock_timeout', {postgres.quote_literal(lock_timeout)}, true)" if lock_timeout else "",
        cursor.mogrify(*ledger.retire_statement(TABLE, LEGACY)).decode(),
        triggers.create_sql(LIVE),
        f"ALTER TABLE {TABLE} DROP COLUMN {LEGACY}",
        *recorded,
        record.statement(cursor) if record is not None else "",
        # the reads after the commit, which releases the ACCESS EXCLUSIVE lock: a count does not hold it
        *(["COMMIT", round_trips.reads_statement(cursor, *([record.query()] if record is not None else []), *reads)]
          if record is not None or reads else []),
    )
