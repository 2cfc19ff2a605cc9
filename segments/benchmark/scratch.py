"""The benchmark's scratch schema: one per run, always removed, leftovers of killed runs collected.

A run works only inside its own schema, named after its database session:
`benchmark_<backend pid>_<backend start, epoch seconds>`. A later run drops every such schema
whose session no longer exists (its run was killed, SIGKILL included) and leaves alone those of
runs still going. The live tables are only ever read.

Scratch copies of a live table are made with `CREATE TABLE ... (LIKE public.x INCLUDING ALL)`,
then given their own id sequence (the copied default would draw ids from the live table's
sequence) and stripped of vector indexes (the backfill runs before the HNSW index exists).
"""
import logging
import signal
from contextlib import contextmanager
from dataclasses import dataclass

from django.db import DatabaseError, InterfaceError, connections, transaction

logger = logging.getLogger(__name__)

PREFIX = "benchmark_"
NAME_REGEX = "^benchmark_[0-9]+_[0-9]+$"

# A session's scratch schema name, computed from pg_stat_activity row `a`.
_SESSION_NAME_SQL = "'benchmark_' || a.pid || '_' || floor(extract(epoch FROM a.backend_start))::bigint"


def quote(name):
    """`name` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Scratch:
    """A run's scratch schema on database alias `using`."""

    schema: str
    using: str
    dropped_leftovers: tuple

    def table(self, name):
        """The schema-qualified, quoted name of scratch table `name`."""
        return f"{quote(self.schema)}.{quote(name)}"

    @property
    def search_path(self):
        """A search_path that resolves unqualified names to this schema first."""
        return f"{quote(self.schema)}, public"

    @contextmanager
    def searched_first(self, cursor):
        """Within a transaction, make unqualified names resolve to this schema (SET LOCAL)."""
        with transaction.atomic(using=self.using):
            cursor.execute(f"SET LOCAL search_path TO {self.search_path}")
            cursor.execute("SELECT current_schema()")
            current = cursor.fetchone()[0]
            if current != self.schema:  # never let scratch DDL land in a live schema
                raise RuntimeError(f"search_path resolved to {current!r}, not the scratch schema {self.schema!r}.")
            yield cursor


def session_schema_name(cursor):
    """The scratch schema name for the session `cursor` belongs to."""
    cursor.execute(f"SELECT {_SESSION_NAME_SQL} FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()")
    return cursor.fetchone()[0]


def leftover_schemas(cursor):
    """Scratch schemas whose session is gone: their runs were killed before cleaning up."""
    cursor.execute(
        f"""
        SELECT n.nspname FROM pg_namespace n
        WHERE n.nspname ~ %s
          AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE {_SESSION_NAME_SQL} = n.nspname)
        ORDER BY n.nspname
        """,
        [NAME_REGEX],
    )
    return [name for (name,) in cursor.fetchall()]


def drop_leftovers(using="default"):
    """Drop the scratch schemas of runs that were killed; returns their names."""
    with connections[using].cursor() as cursor:
        names = leftover_schemas(cursor)
        for name in names:
            cursor.execute(f"DROP SCHEMA IF EXISTS {quote(name)} CASCADE")
            logger.info("dropped %s, left behind by a benchmark run that was killed", name)
    return names


def scratch_schemas(using="default"):
    """Every scratch schema in the database, of live runs and leftovers alike."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT nspname FROM pg_namespace WHERE nspname ~ %s ORDER BY 1", [NAME_REGEX])
        return [name for (name,) in cursor.fetchall()]


@contextmanager
def signals_deferred(*signums):
    """Hold back `signums` for the block (so a cleanup is not cut short); delivered after."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    except (ValueError, OSError):  # not the main thread, or no such facility
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


def _drop(using, name):
    statement = f"DROP SCHEMA IF EXISTS {quote(name)} CASCADE"
    connection = connections[using]
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    except (DatabaseError, InterfaceError):
        # The session broke (or is stuck in a failed transaction): drop from a fresh one.
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute(statement)


@contextmanager
def scratch_schema(using="default"):
    """Create this run's scratch schema (after dropping leftovers); drop it on the way out.

    The drop runs on every exit: normal, exception, KeyboardInterrupt, or SIGTERM turned into
    an exception by `interrupts.sigterm_raises`. SIGINT and SIGTERM are held back meanwhile.
    """
    dropped = drop_leftovers(using)
    with signals_deferred(signal.SIGINT, signal.SIGTERM), connections[using].cursor() as cursor:
        name = session_schema_name(cursor)
        cursor.execute(f"CREATE SCHEMA {quote(name)}")
    try:
        yield Scratch(name, using, tuple(dropped))
    finally:
        with signals_deferred(signal.SIGINT, signal.SIGTERM):
            _drop(using, name)


def copy_table(cursor, scratch, live, name=None):
    """Create scratch table `name` (default: `live`) shaped like public.`live`; returns its name."""
    target = scratch.table(name or live)
    cursor.execute(f"CREATE TABLE {target} (LIKE public.{quote(live)} INCLUDING ALL)")
    return target


def own_id_sequence(cursor, scratch, table, start=1):
    """Give scratch `table`'s id column a sequence of its own, starting at `start`."""
    sequence = scratch.table(f"{table}_id_seq")
    cursor.execute(f"CREATE SEQUENCE {sequence} START {int(start)} OWNED BY {scratch.table(table)}.id")
    cursor.execute(f"ALTER TABLE {scratch.table(table)} ALTER COLUMN id SET DEFAULT nextval('{sequence}')")


def drop_vector_indexes(cursor, table):
    """Drop the HNSW and IVFFlat indexes of `table` (a quoted, qualified name)."""
    cursor.execute(
        """
        SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_am a ON a.oid = c.relam
        WHERE i.indrelid = %s::regclass AND a.amname IN ('hnsw', 'ivfflat')
        """,
        [table],
    )
    for (index,) in cursor.fetchall():
        cursor.execute(f"DROP INDEX {index}")
