"""Migration building blocks for changing a live table without blocking its traffic.

- `LockTimeoutMigration`: every statement of the migration runs under `lock_timeout`, so a
  migration that cannot get its lock gives up quickly (and changes nothing) instead of queueing
  the application's queries behind it.
- `AddIndexConcurrently`: Django's, made safe to re-run: a VALID index of the same name is
  kept, an INVALID one (left by an interrupted build) is dropped and built again. The build runs
  with the maintenance_work_mem and parallel workers segments.index_build chooses (for an HNSW
  index, sized to its graph; the build says what it chose and why), and without lock_timeout or
  statement_timeout: its SHARE UPDATE EXCLUSIVE lock blocks no query of the application, and
  it waits, however long, for the transactions older than it (a pg_dump, a long report) rather
  than throw the built index away. While it waits, `watching_build` says
  for which session.
- `IrreversibleStep`: operations that must never be undone (dropping the legacy column).
- `CreateVectorExtension`: pgvector's extension, with an error naming the fix when it is missing.
"""
import logging
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

from django.conf import settings
from django.contrib.postgres import operations as postgres_operations
from django.core.management.base import CommandError
from django.db import connections, migrations
from django.db.utils import DatabaseError, OperationalError, ProgrammingError
from pgvector.django import HnswIndex, VectorExtension

from segments import index_build

logger = logging.getLogger(__name__)

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
WATCH_INTERVAL = 1.0  # seconds between two looks at what a concurrent build waits for
WATCHER_NAME = "segments index build watcher"  # its application_name in pg_stat_activity
QUERY_SHOWN = 200  # characters of a blocking session's query that are reported

_output = ContextVar("segments_operations_output", default=None)


class MigrationLocked(CommandError):
    """A migration gave up waiting for its lock; nothing was changed."""


class LockTimeoutMigration(migrations.Migration):
    """A migration whose statements run under settings.MIGRATION_LOCK_TIMEOUT.

    It must be atomic: `SET LOCAL` lasts until the migration's transaction ends, and a timeout
    rolls back everything the migration did.
    """

    def apply(self, project_state, schema_editor, collect_sql=False):
        with lock_timeout(self, schema_editor):
            return super().apply(project_state, schema_editor, collect_sql)

    def unapply(self, project_state, schema_editor, collect_sql=False):
        with lock_timeout(self, schema_editor):
            return super().unapply(project_state, schema_editor, collect_sql)


@contextmanager
def lock_timeout(migration, schema_editor):
    """Run the block under `SET LOCAL lock_timeout`; a timeout becomes a MigrationLocked error."""
    if not migration.atomic:
        raise ValueError(f"{migration.app_label}.{migration.name}: set atomic = True to use lock_timeout.")
    schema_editor.execute("SET LOCAL lock_timeout = %s", [settings.MIGRATION_LOCK_TIMEOUT])
    with giving_up_on_lock_timeout(f"Migration {migration.app_label}.{migration.name}"):
        yield


@contextmanager
def giving_up_on_lock_timeout(what):
    """Turn PostgreSQL's lock-timeout error into a MigrationLocked that says what to do."""
    try:
        yield
    except OperationalError as exc:
        if getattr(exc.__cause__, "pgcode", None) != LOCK_NOT_AVAILABLE:
            raise
        raise MigrationLocked(
            f"{what} gave up after lock_timeout={settings.MIGRATION_LOCK_TIMEOUT}: another "
            "session holds a lock on its table (see pg_locks and pg_stat_activity). Nothing was "
            "left half-done; run migrate again once that session has finished."
        ) from exc


def index_validity(schema_editor, name):
    """True if index `name` exists and is valid, False if it exists but is INVALID, else None."""
    from segments.switch.catalog import index_valid

    with schema_editor.connection.cursor() as cursor:
        return index_valid(cursor, name)


class AddIndexConcurrently(postgres_operations.AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY that survives being interrupted and run again, and that waits
    for older transactions instead of giving up (see the module's docstring)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        with concurrent_build(schema_editor, self.index.name, self._plan(app_label, schema_editor, to_state)):
            self._build(app_label, schema_editor, from_state, to_state)

    def _plan(self, app_label, schema_editor, to_state):
        """The build's memory and workers; sized to the graph for an HNSW index on a column."""
        if schema_editor.collect_sql or not isinstance(self.index, HnswIndex) or not self.index.fields:
            return None  # sqlmigrate: the column may not exist yet, there is nothing to count
        model = to_state.apps.get_model(app_label, self.model_name_lower)
        column = model._meta.get_field(self.index.fields[0].lstrip("-")).column
        opclass = self.index.opclasses[0] if self.index.opclasses else None
        with schema_editor.connection.cursor() as cursor:
            return index_build.plan(cursor, model._meta.db_table, column, self.index.m, opclass=opclass)

    def _build(self, app_label, schema_editor, from_state, to_state):
        valid = index_validity(schema_editor, self.index.name)
        if valid:
            return  # built by an earlier run that stopped before recording the migration
        if valid is False:
            # An interrupted CONCURRENTLY build leaves an INVALID index that is maintained on
            # every write but never used by a query: drop it and build it again.
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(self.index.name)}")
        self._ensure_not_in_transaction(schema_editor)
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            schema_editor.add_index(model, for_column_type(self.index, model, schema_editor), concurrently=True)


def for_column_type(index, model, schema_editor):
    """`index`, with its cosine operator class matching the column's type as it is in the database
    (vector_cosine_ops on a vector column, halfvec_cosine_ops on a halfvec one: segments/storage.py)."""
    from segments.schema import vector_column_types
    from segments.storage import COSINE_OPCLASSES, configured, storage_named

    if not any(opclass in COSINE_OPCLASSES for opclass in index.opclasses):
        return index
    column = model._meta.get_field(index.fields[0]).column
    found = vector_column_types(schema_editor.connection.alias).get(column)
    # sqlmigrate before phase 1: the column does not exist yet; it will have the configured type
    wanted = storage_named(found[0]).cosine_opclass if found else configured().cosine_opclass
    matching = index.clone()
    matching.opclasses = [wanted if opclass in COSINE_OPCLASSES else opclass for opclass in index.opclasses]
    return matching


@contextmanager
def concurrent_build(schema_editor, name, plan=None):
    """What every CREATE INDEX CONCURRENTLY of the project runs under: the maintenance_work_mem and
    parallel workers of `plan` (segments.index_build; by default those of an index that is not
    HNSW), said with the reasons; no lock_timeout or statement_timeout (session settings, given
    back afterwards); a cancelled build turned into an error saying what to do; and a watcher
    saying what the build waits for."""
    if plan is None:
        with schema_editor.connection.cursor() as cursor:
            plan = index_build.plan(cursor)
    _say(logging.INFO, plan.describe(f"index {name}"))
    if plan.warning:
        _say(logging.WARNING, f"{name}: {plan.warning}")
    with session_settings(schema_editor, **plan.session_settings(), lock_timeout="0", statement_timeout="0"):
        with cancelled_build(name), watching_build(schema_editor, f"Building index {name}"):
            yield


@contextmanager
def session_settings(schema_editor, **values):
    """Set these settings for the session during the block, then give back the values it had."""
    names = list(values)
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(["current_setting(%s)"] * len(names)), names)
        previous = dict(zip(names, cursor.fetchone()))
    _set_config(schema_editor, values)
    try:
        yield
    finally:
        if schema_editor.collect_sql or schema_editor.connection.is_usable():  # else the session is gone
            _set_config(schema_editor, previous)


def _set_config(schema_editor, values):
    schema_editor.execute(
        "SELECT " + ", ".join(["set_config(%s, %s, false)"] * len(values)),
        [item for name_value in values.items() for item in name_value],
    )


@contextmanager
def cancelled_build(name):
    """Turn a cancelled build (pg_cancel_backend) into an error that says what to do."""
    try:
        yield
    except OperationalError as exc:
        if getattr(exc.__cause__, "pgcode", None) != QUERY_CANCELED:
            raise
        raise CommandError(
            f"Building index {name} was cancelled (pg_cancel_backend). Any INVALID index it left "
            "behind is dropped and built again by the next run: run the same command again."
        ) from exc


def _say(level, message):
    """Log `message`, and write it to the stream `reporting_to` gives, if any."""
    logger.log(level, message)
    stream = _output.get()
    if stream is not None:
        stream.write(message + "\n")


@contextmanager
def reporting_to(stream):
    """Write what concurrent index builds wait for to `stream` (a command's stdout) as well as
    to the log, during the block."""
    token = _output.set(stream)
    try:
        yield
    finally:
        _output.reset(token)


@contextmanager
def watching_build(schema_editor, what):
    """While the block runs statements on `schema_editor`'s connection, a thread with its own
    connection reports each session the statement waits for (once per session's transaction)."""
    if schema_editor.collect_sql:
        yield  # sqlmigrate: nothing runs, nothing waits
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    watcher = BuildWatcher(schema_editor.connection.alias, pid, what, _output.get())
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


class BuildWatcher(threading.Thread):
    """Polls pg_blocking_pids() and pg_stat_progress_create_index for backend `pid`, about once a
    second, and reports every blocking transaction once. It connects on its first look (a build
    that waits for nothing is done before then) and always closes its connection."""

    def __init__(self, alias, pid, what, stream=None):
        super().__init__(name=f"{WATCHER_NAME} ({what})", daemon=True)
        self.alias, self.pid, self.what, self.stream = alias, pid, what, stream
        self._stopping = threading.Event()
        self._reported = set()

    def stop(self):
        self._stopping.set()
        self.join()

    def run(self):
        connection = None
        try:
            while not self._stopping.wait(WATCH_INTERVAL):
                if connection is None:
                    connection = connections.create_connection(self.alias)
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT set_config('application_name', %s, false), "
                                       "set_config('statement_timeout', '5s', false)", [WATCHER_NAME])
                self._look(connection)
        except DatabaseError as exc:
            logger.warning("%s: cannot tell what it waits for (%s); it goes on regardless.", self.what, exc)
        finally:
            if connection is not None:
                connection.close()

    def _look(self, connection):
        with connection.cursor() as cursor:
            cursor.execute(BLOCKERS_SQL, {"pid": self.pid, "shown": QUERY_SHOWN + 1})
            for blocker in cursor.fetchall():
                if blocker[:2] not in self._reported:
                    self._reported.add(blocker[:2])
                    self._report(*blocker[2:])

    def _report(self, pid, state, seconds, query, phase, lockers_done, lockers_total):
        query = shown_query(query)
        age = "unknown" if seconds is None else str(timedelta(seconds=int(seconds)))
        if lockers_total:
            phase = f"{phase}: {lockers_done} of {lockers_total} transactions done"
        progress = f" ({phase})" if phase else ""
        message = (
            f"{self.what} is waiting, not failing{progress}: pid {pid} ({state or 'state unknown'}, "
            f"transaction open {age}) holds it up; its query: {query or 'unknown'!r}. "
            "The build carries on by itself once that transaction ends."
        )
        logger.warning(message)
        if self.stream is not None:
            self.stream.write(message + "\n")


def shown_query(query):
    """A session's query as reported: whitespace collapsed, cut at QUERY_SHOWN characters."""
    query = " ".join((query or "").split())
    return query[:QUERY_SHOWN] + "..." if len(query) > QUERY_SHOWN else query


# The sessions backend %(pid)s waits for: those pg_blocking_pids() names (the lock waits) and the
# transaction a concurrent build waits out (its virtualxid waits); never the watcher itself.
BLOCKERS_SQL = """
WITH progress AS (
    SELECT phase, lockers_done, lockers_total, current_locker_pid
    FROM pg_stat_progress_create_index WHERE pid = %(pid)s
)
SELECT a.pid, a.xact_start, a.pid, a.state, extract(epoch FROM now() - a.xact_start),
       left(a.query, %(shown)s), p.phase, p.lockers_done, p.lockers_total
FROM pg_stat_activity a LEFT JOIN progress p ON true
WHERE (a.pid = ANY (pg_blocking_pids(%(pid)s)) OR a.pid = p.current_locker_pid)
  AND a.pid <> pg_backend_pid()
"""


class IrreversibleStep(migrations.SeparateDatabaseAndState):
    """Database and state operations that cannot be undone: migrating back past them raises
    IrreversibleError before anything is changed."""

    reversible = False


class CreateVectorExtension(VectorExtension):
    """CREATE EXTENSION vector, with an error that names the fix when the server lacks pgvector."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        with schema_editor.connection.cursor() as cursor:
            cursor.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
            if cursor.fetchone() is None:
                raise CommandError(
                    "This PostgreSQL server does not have the pgvector extension installed, and "
                    "the segments table needs it. Install pgvector on the server (packages are "
                    "named postgresql-<version>-pgvector; see github.com/pgvector/pgvector), or "
                    "unset DATABASE_URL to use the embedded PostgreSQL that ships with it."
                )
        try:
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        except ProgrammingError as exc:
            raise CommandError(
                f"CREATE EXTENSION vector failed: {exc}. Ask a superuser to run "
                "`CREATE EXTENSION vector;` in this database, then migrate again."
            ) from exc
