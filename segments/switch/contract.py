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

Steps 1-3 can be interrupted and run again: they resume with what is left. From step 1 on the
swap can no longer be undone: `embedding_switch contract` asks for an explicit confirmation
first, and records that it started, so that an undo is refused. A transaction or query that
stays open meanwhile (in the same database) keeps the row versions it can see from being freed:
rows then move instead of being rewritten in place. So each VACUUM of step 3 first waits (up to
WAIT_FOR_OLDER_TRANSACTIONS_SECONDS) for the transactions older than the contract's last write,
naming them (segments/switch/horizon.py); one still open after that is reported in the result
(`held_back_by`), and the space it holds comes back at a VACUUM after it ends.
"""
import time

from django.core.management.base import CommandError
from psycopg2 import errors

from askdrchaffee import postgres
from segments.schema import PREVIOUS as LEGACY
from segments.schema import TABLE
from segments.switch import catalog, horizon, out_of_line
from segments.switch.swap import SwapRefused
from segments.switch.user_triggers import triggers_to_quiet

# Rows a clearing or moving transaction looks at; it writes at most this many, and an application
# write to one of them waits for it (a few ms a row where the row moves to another page).
DEFAULT_ROWS_PER_TRANSACTION = 100
LOCK_TIMEOUT = "5s"  # a batch waiting behind an application transaction gives up, then retries
LOCK_ATTEMPTS = 5
# How long each VACUUM waits for the transactions older than the contract's writes (horizon.py).
WAIT_FOR_OLDER_TRANSACTIONS_SECONDS = 300
FIRST_ID = -(2**31) - 1  # below every id (a literal PostgreSQL reads as bigint, so the id index serves)

RELATION_SIZES = f"""
    SELECT pg_relation_size(c.oid), COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0),
           pg_indexes_size(c.oid), pg_total_relation_size(c.oid)
    FROM pg_class c WHERE c.oid = to_regclass('{TABLE}')
"""


class ContractRefused(SwapRefused):
    """The contract cannot start now; nothing was changed."""


class ContractInterrupted(CommandError):
    """A batch kept waiting behind the application's locks; what was done stays done."""


def refuse_dependent_views(cursor):
    """ContractRefused naming the views that still select the legacy column."""
    views = catalog.dependent_views(cursor, LEGACY)
    if views:
        names = ", ".join(f"{view.name} ({view.kind})" for view in views)
        raise ContractRefused(
            f"Contract refused, nothing changed: {names} select(s) segments.{LEGACY}, which the contract "
            "drops. Redefine them without that column (or drop them), then run the contract again."
        )


def table_size(cursor):
    """pg_total_relation_size of segments: heap, TOAST and indexes."""
    return relation_sizes(cursor)["total_bytes"]


def relation_sizes(cursor):
    """Bytes on disk of segments' heap, its TOAST table (with its index), its indexes, and all of
    them together (with the heap's free space and visibility maps)."""
    cursor.execute(RELATION_SIZES)
    return dict(zip(("heap_bytes", "toast_bytes", "indexes_bytes", "total_bytes"), cursor.fetchone()))


def drop_legacy_indexes(connection, out):
    """DROP INDEX CONCURRENTLY each vector index on the legacy column; their names. (It waits for
    the transactions using the table at the time, blocking none; one left INVALID by an
    interrupted drop is dropped by the next run.)"""
    with connection.cursor() as cursor:
        indexes = [index.name for index in catalog.column_indexes(cursor, LEGACY) if index.method != "btree"]
    for name in indexes:
        out(f"dropping the legacy index {name} (CONCURRENTLY)")
        patiently(connection, lambda cursor: cursor.execute(
            f"DROP INDEX CONCURRENTLY IF EXISTS {postgres.quote_ident(name)}"), local=None)
    return indexes


def transaction_settings(cursor):
    """What each of the contract's own transactions sets for itself (read once per run): lock_timeout,
    and session_replication_role = replica where the application's triggers would fire on its writes
    (TriggersNotQuieted, naming the GRANT, when the role may not set it)."""
    values = {"lock_timeout": LOCK_TIMEOUT}
    if triggers_to_quiet(cursor):
        values["session_replication_role"] = "replica"
    return values


def patiently(connection, work, local):
    """work(cursor), in one transaction that sets `local` (transaction_settings()) for itself only, or
    outside any transaction when `local` is None; after a lock timeout or a deadlock, again
    (LOCK_ATTEMPTS times in all), then ContractInterrupted."""
    retrying = postgres.retrying(attempts=LOCK_ATTEMPTS, wait=lambda attempt: 0.1 * attempt,
                                 on=(errors.LockNotAvailable, errors.DeadlockDetected), what="a contract batch")
    try:
        return retrying(_once, connection, work, local)
    except (errors.LockNotAvailable, errors.DeadlockDetected):
        raise ContractInterrupted(
            f"The contract stopped: it waited for the application's transactions {LOCK_ATTEMPTS} times "
            f"({LOCK_TIMEOUT} each). What it did stays done; run `manage.py embedding_switch contract "
            "--confirm` again when no transaction stays open on segments (a smaller --rows-per-transaction "
            "makes each of its own transactions shorter)."
        ) from None


def _once(connection, work, local):
    with connection.cursor() as cursor:
        if local is None:
            return work(cursor)
        cursor.execute("BEGIN")
        try:
            postgres.set_local(cursor, **local)
            result = work(cursor)
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")
        return result


CANDIDATES = f"""
    SELECT id, (ctid::text::point)[0] FROM {TABLE}
    WHERE id > %s AND {LEGACY} IS NOT NULL ORDER BY id LIMIT %s
"""
CLEAR = f"UPDATE {TABLE} SET {LEGACY} = NULL WHERE id = ANY(%s) AND {LEGACY} IS NOT NULL"


def one_per_page(candidates):
    """The ids of the first candidate (id, page) on each page."""
    pages, chosen = set(), []
    for row_id, page in candidates:
        if page not in pages:
            pages.add(page)
            chosen.append(row_id)
    return chosen


def clear_batch(cursor, after, rows_per_transaction):
    """Clear one row per page among the next `rows_per_transaction` legacy vectors after id `after`;
    (rows cleared, the id to continue after; None when none is left)."""
    cursor.execute(CANDIDATES, [after, rows_per_transaction])
    candidates = cursor.fetchall()
    if not candidates:
        return 0, None
    chosen = one_per_page(candidates)
    cursor.execute(CLEAR, [chosen])
    taken = set(chosen)
    left = [row_id for row_id, _ in candidates if row_id not in taken]
    return cursor.rowcount, (min(left) - 1 if left else candidates[-1][0])


def clear_legacy_vectors(connection, rows_per_transaction, local, progress=None):
    """Set the legacy column to NULL, a batch a transaction (each setting `local`); how many rows were cleared."""
    cleared, after = 0, FIRST_ID
    while after is not None:
        done, after = patiently(connection, lambda cursor: clear_batch(cursor, after, rows_per_transaction), local)
        cleared += done
        if progress is not None and done:
            progress(done)
    return cleared


# The values still stored out of line are moved only when they fill at most this share of the TOAST
# table: the rest is free space at its front for their new copies.
MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST = 0.5


def move_out_of_line_values(connection, rows_per_transaction, local, progress_factory=None, out=print):
    """Rewrite the values stored out of line, `rows_per_transaction` rows a transaction (each setting
    `local`), so that they move to the front of the TOAST table; how many rows were rewritten (0 without
    room to move them into)."""
    with connection.cursor() as cursor:
        rewrite = out_of_line.Rewrite(cursor, skip={LEGACY})
        (rows, stored), toast = rewrite.stored(cursor), relation_sizes(cursor)["toast_bytes"]
        if stored > MOVE_WHEN_OUT_OF_LINE_FILLS_AT_MOST * toast:
            out(f"the values stored out of line fill {stored / max(toast, 1):.0%} of the TOAST table: no room "
                "to move them to its front, left where they are")
            return 0
        bar = progress_factory(rows) if progress_factory else None
    if bar is not None and hasattr(bar, "set_description"):
        bar.set_description("moving out-of-line values")
    moved, after = 0, FIRST_ID
    try:
        while True:
            ids = patiently(connection, lambda cursor: rewrite.batch(cursor, after, rows_per_transaction), local)
            if not ids:
                return moved
            moved, after = moved + len(ids), max(ids)
            if bar is not None:
                bar.update(len(ids))
    finally:
        if bar is not None:
            bar.close()


def count_legacy_vectors(cursor):
    cursor.execute(f"SELECT count(*) FROM {TABLE} WHERE {LEGACY} IS NOT NULL")
    return cursor.fetchone()[0]


def vacuum_after_writes(connection, out, wait_seconds, held_back, analyze=False):
    """vacuum() once the transactions that began before now have ended (or `wait_seconds` have
    passed: what still holds the space is recorded in `held_back`, {who: description})."""
    with connection.cursor() as cursor:
        since = horizon.server_now(cursor)
    for holder in horizon.wait(connection, since, out, wait_seconds):
        held_back[holder.who] = holder.line
    vacuum(connection, analyze)


def vacuum(connection, analyze=False):
    """Plain VACUUM of segments (outside a transaction; no lock that blocks reads or writes, but
    for the moment it truncates empty trailing pages, and only if it gets that lock at once).

    INDEX_CLEANUP ON: by default a VACUUM that finds dead rows on under 2% of a table's pages skips
    its index pass and leaves those rows' line pointers behind (PostgreSQL 14+), and a page that
    still holds one cannot be truncated. After the out-of-line values have moved, their old chunks
    are on just such a few pages, near the end of the TOAST table: the whole file would stay."""
    options = "ANALYZE, INDEX_CLEANUP ON, TRUNCATE" if analyze else "INDEX_CLEANUP ON, TRUNCATE"
    patiently(connection, lambda cursor: cursor.execute(f"VACUUM ({options}) {TABLE}"), local=None)


def raw_connection(using):
    """A psycopg2 connection of its own in autocommit mode (VACUUM and CONCURRENTLY need one), with
    lock_timeout as a startup option: over DATABASE_DIRECT_URL behind a pooler (askdrchaffee.postgres)."""
    return postgres.private_connection(using, "The contract", settings={"lock_timeout": LOCK_TIMEOUT},
                                       application_name="embedding_switch contract")


def _megabytes(sizes):
    return (f"{sizes['total_bytes'] / 2**20:,.1f} MB (heap {sizes['heap_bytes'] / 2**20:,.1f}, "
            f"TOAST {sizes['toast_bytes'] / 2**20:,.1f}, indexes {sizes['indexes_bytes'] / 2**20:,.1f})")


def run(raw, rows_per_transaction=DEFAULT_ROWS_PER_TRANSACTION, out=print, progress_factory=None,
        wait_seconds=None):
    """Steps 1-3 of the contract on `raw` (raw_connection(); the caller applies the contract migration
    after); returns its figures."""
    if wait_seconds is None:
        wait_seconds = WAIT_FOR_OLDER_TRANSACTIONS_SECONDS
    started, held_back = time.perf_counter(), {}
    with raw.cursor() as cursor:
        refuse_dependent_views(cursor)
        local = transaction_settings(cursor)
        sizes = {"start": relation_sizes(cursor)}
        to_clear = count_legacy_vectors(cursor)
    dropped = drop_legacy_indexes(raw, out)
    vacuum(raw)
    out(f"clearing {to_clear:,} legacy vectors, at most {rows_per_transaction} a transaction")
    bar = progress_factory(to_clear) if progress_factory else None
    try:
        cleared = clear_legacy_vectors(raw, rows_per_transaction, local, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    vacuum_after_writes(raw, out, wait_seconds, held_back)
    with raw.cursor() as cursor:
        sizes["cleared"] = relation_sizes(cursor)
    out(f"cleared {cleared:,} legacy vectors; segments is {_megabytes(sizes['cleared'])}; "
        "moving the values stored out of line to the front of the TOAST table")
    moved = move_out_of_line_values(raw, rows_per_transaction, local, progress_factory, out)
    vacuum_after_writes(raw, out, wait_seconds, held_back, analyze=True)
    with raw.cursor() as cursor:
        sizes["moved"] = relation_sizes(cursor)
    out(f"rewrote the out-of-line values of {moved:,} segments; segments is {_megabytes(sizes['moved'])}")
    if held_back:
        out(f"NOT all the space came back: {'; '.join(held_back.values())} still saw the cleared rows after "
            f"{wait_seconds} s. A VACUUM of segments after it ends (autovacuum runs one) frees them.")
    return {
        "legacy_indexes_dropped": dropped,
        "legacy_vectors_cleared": cleared,
        "out_of_line_rows_moved": moved,
        "size_before_contract_bytes": sizes["start"]["total_bytes"],
        "size_after_vacuum_bytes": sizes["moved"]["total_bytes"],
        "sizes": sizes,
        "held_back_by": list(held_back.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def drop_legacy_column(schema_editor):
    """A switch's contract migration: the trigger stops guarding the legacy column, its entry in the
    model ledger is retired (if the contract's clearing has not retired it already), and the column
    is dropped."""
    from embeddings import ledger
    from segments import triggers
    from segments.schema import LIVE

    with schema_editor.connection.cursor() as cursor:
        refuse_dependent_views(cursor)
        ledger.retire(cursor, TABLE, LEGACY)
    schema_editor.execute(triggers.create_sql(LIVE))
    schema_editor.execute(f"ALTER TABLE segments DROP COLUMN {LEGACY}")
