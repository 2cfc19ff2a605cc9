"""Phase 4, the contract: give the legacy vectors' disk space back, online, then drop the column.

`ALTER TABLE ... DROP COLUMN` frees nothing on disk: the 1536-dim vectors (about 6 kB a row, in
TOAST) stay until every row is rewritten, and `VACUUM FULL` rewrites the table under an ACCESS
EXCLUSIVE lock for the whole rewrite. Instead, `run()`:

1. drops the legacy vector indexes with `DROP INDEX CONCURRENTLY` (no query used them after the
   swap, and they make every clearing write dearer);
2. sets `embedding_legacy` to NULL in batches of `batch_size` rows, one short transaction each
   (row locks of one batch; the application's triggers do not fire: the rows' values are
   otherwise unchanged), with a progress bar;
3. runs a plain `VACUUM` (no lock that blocks reads or writes), which frees the dead TOAST
   chunks and heap space for reuse and returns the empty pages at the end of each file;
4. drops the column (migration 0008: ACCESS EXCLUSIVE for milliseconds, under lock_timeout).

From step 1 on the swap can no longer be undone: `embedding_switch contract` asks for an
explicit confirmation first, and records that it started, so that an undo is refused.
"""
import time

from segments.switch import catalog
from segments.switch.swap import LEGACY, SwapRefused

DEFAULT_BATCH_SIZE = 2000
LOCK_TIMEOUT = "5s"  # a batch waiting behind an application transaction gives up and retries

TABLE_SIZE = "SELECT pg_total_relation_size('segments')"


class ContractRefused(SwapRefused):
    """The contract cannot start now; nothing was changed."""


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
    cursor.execute(TABLE_SIZE)
    return cursor.fetchone()[0]


def drop_legacy_indexes(connection, out):
    """DROP INDEX CONCURRENTLY each vector index on the legacy column; their names."""
    with connection.cursor() as cursor:
        indexes = [index.name for index in catalog.column_indexes(cursor, LEGACY) if index.method != "btree"]
        for name in indexes:
            out(f"dropping the legacy index {name} (CONCURRENTLY)")
            cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {catalog.quote_ident(name)}")
    return indexes


CLEAR_BATCH = f"""
    WITH batch AS (
        SELECT id FROM segments WHERE id > %s AND {LEGACY} IS NOT NULL ORDER BY id LIMIT %s FOR UPDATE
    )
    UPDATE segments s SET {LEGACY} = NULL FROM batch WHERE s.id = batch.id RETURNING s.id
"""


def clear_legacy_vectors(connection, batch_size, progress=None):
    """Set the legacy column to NULL, `batch_size` rows a transaction; how many rows were cleared."""
    from segments.switch.user_triggers import quiet_user_triggers

    cleared, after = 0, -(2**31) - 1
    with connection.cursor() as cursor:
        quiet_user_triggers(cursor)
        cursor.execute("SELECT set_config('lock_timeout', %s, false)", [LOCK_TIMEOUT])
    while True:
        with connection.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute(CLEAR_BATCH, [after, batch_size])
            ids = [row[0] for row in cursor.fetchall()]
            cursor.execute("COMMIT")
        if not ids:
            return cleared
        cleared += len(ids)
        after = max(ids)
        if progress is not None:
            progress(len(ids))


def count_legacy_vectors(cursor):
    cursor.execute(f"SELECT count(*) FROM segments WHERE {LEGACY} IS NOT NULL")
    return cursor.fetchone()[0]


def vacuum(connection):
    """Plain VACUUM of segments (it runs outside a transaction; no lock that blocks the application)."""
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE) segments")


def raw_connection(using):
    """A psycopg2 connection of its own in autocommit mode (VACUUM and CONCURRENTLY need one)."""
    from segments.switch.backfill.session import open_connection

    raw = open_connection(using, "contract")
    raw.autocommit = True
    return raw


def run(using="default", batch_size=DEFAULT_BATCH_SIZE, out=print, progress_factory=None):
    """Steps 1-3 of the contract (the caller applies migration 0008 after); returns its figures."""
    started = time.perf_counter()
    raw = raw_connection(using)
    try:
        with raw.cursor() as cursor:
            refuse_dependent_views(cursor)
            size_before = table_size(cursor)
            to_clear = count_legacy_vectors(cursor)
        dropped = drop_legacy_indexes(raw, out)
        bar = progress_factory(to_clear) if progress_factory else None
        try:
            cleared = clear_legacy_vectors(raw, batch_size, bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        out(f"cleared {cleared:,} legacy vectors; VACUUM segments (reads and writes go on)")
        vacuum(raw)
        with raw.cursor() as cursor:
            size_after = table_size(cursor)
    finally:
        raw.close()
    return {
        "legacy_indexes_dropped": dropped,
        "legacy_vectors_cleared": cleared,
        "size_before_contract_bytes": size_before,
        "size_after_vacuum_bytes": size_after,
        "seconds": round(time.perf_counter() - started, 1),
    }


def drop_legacy_column(apps, schema_editor):
    """Migration 0008: the trigger stops guarding the legacy column, and the column is dropped."""
    from segments import triggers
    from segments.switch.swap import LIVE

    with schema_editor.connection.cursor() as cursor:
        refuse_dependent_views(cursor)
    schema_editor.execute(triggers.create_sql(LIVE))
    schema_editor.execute(f"ALTER TABLE segments DROP COLUMN {LEGACY}")
