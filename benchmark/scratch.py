"""The benchmark's scratch schema: one per run, always removed, leftovers of killed runs collected.

A run works only inside its own schema, named after its database session:
`benchmark_<backend pid>_<backend start, epoch seconds>`. A later run drops every such schema
whose session no longer exists (its run was killed, SIGKILL included) and leaves alone those of
runs still going. The live tables are only ever read.

Each scratch schema has a model ledger of its own (embeddings/ledger.py: the table
`embeddings_vector_column`, made from its model, as at the legacy phase the live database has
none): every writer of vectors records and checks the model of the column it writes there, and
the benchmark's writers resolve the ledger in the scratch schema (the engine's connections through
their search_path, the db-write suite's session through `search_path_of`), so the live ledger is
only ever read too. Its rows are keyed by the scratch schema and go with it; `forget_models`
empties it before a table that was written is dropped or made again (the next run may write
another model's vectors).

Scratch copies of a live table are made with `CREATE TABLE ... (LIKE public.x INCLUDING ALL)`,
then given their own id sequence (the copied default would draw ids from the live table's
sequence) and stripped of vector indexes (the backfill runs before the HNSW index exists).
"""
import logging
import re
import signal
from contextlib import contextmanager
from dataclasses import dataclass

from django.apps import apps
from django.db import DatabaseError, InterfaceError, connections, transaction

from embeddings.ledger import LEDGER

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

    def forget_models(self, cursor):
        """Empty this schema's model ledger."""
        cursor.execute(f"DELETE FROM {self.table(LEDGER)}")

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


def create_from_model(cursor, scratch, model):
    """Create the table of Django model `model` in the scratch schema, as its migrations would."""
    with scratch.searched_first(cursor), connections[scratch.using].schema_editor(atomic=False) as editor:
        editor.create_model(model)


@contextmanager
def search_path_of(using, table):
    """Within the block, the session of database `using` resolves unqualified names (the model
    ledger's among them) in scratch table `table`'s schema first; its search_path is restored after."""
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute("SELECT n.nspname, current_setting('search_path') FROM pg_class c "
                       "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s::regclass", [table])
        schema, previous = cursor.fetchone()
        if not re.match(NAME_REGEX, schema):
            raise RuntimeError(f"{table} is in {schema!r}, not in a benchmark scratch schema.")
        cursor.execute("SELECT set_config('search_path', %s, false)", [f"{quote(schema)}, public"])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('search_path', %s, false)", [previous])


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
    """Create this run's scratch schema (after dropping leftovers) with its model ledger; drop it
    on the way out.

    The drop runs on every exit: normal, exception, KeyboardInterrupt, or SIGTERM turned into
    an exception by `interrupts.sigterm_raises`. SIGINT and SIGTERM are held back meanwhile.
    """
    dropped = drop_leftovers(using)
    with signals_deferred(signal.SIGINT, signal.SIGTERM), connections[using].cursor() as cursor:
        name = session_schema_name(cursor)
        cursor.execute(f"CREATE SCHEMA {quote(name)}")
    try:
        scratch = Scratch(name, using, tuple(dropped))
        with connections[using].cursor() as cursor:
            create_from_model(cursor, scratch, apps.get_model("embeddings", "VectorColumn"))
        yield scratch
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
