"""Migration building blocks for changing a live table without blocking its traffic.

- `LockRetryingExecutor`: Django's executor, with every atomic migration run under a short
  `lock_timeout` (100 ms at first, doubled up to MIGRATION_LOCK_TIMEOUT) and, when that times out
  (the whole migration rolled back, nothing changed), tried again after a pause, for up to
  MIGRATION_LOCK_RETRY_SECONDS (askdrchaffee.postgres.with_lock_retries): a migration never holds
  the application's queries in the lock queue for longer than one short attempt. When it gives
  up it names the transaction that held the lock (MigrationLocked). Every migration the project
  runs goes through it: a plain `migrate`, the operator steps, the demo's and the tests'.
- `LockTimeoutMigration`: the mark of a migration written for this (all of a switch's atomic
  migrations are); it refuses to be made non-atomic.
- `AddIndexConcurrently`: Django's, made safe to re-run: a VALID index of the same name is
  kept, an INVALID one (left by an interrupted build) is dropped and built again. The build
  (`build_concurrently`) runs on a connection of its own, with the maintenance_work_mem and
  parallel workers segments.index_build chooses (for an HNSW index, sized to its graph; the build
  says what it chose and why) and without lock_timeout or statement_timeout, all as startup
  options (askdrchaffee.postgres.private_connection: never a SET on a connection a pooler shares).
  Its SHARE UPDATE EXCLUSIVE lock blocks no query of the application, and it waits, however
  long, for the transactions older than it (a pg_dump, a long report) rather than throw the built
  index away. While it waits, a watcher (BuildWatcher) says for which session. What it says goes
  to the log (logger `segments.operations`) and to `out`, which the command running the
  migration gives the operation (its stdout).
- `SwapEmbedding`, `DropLegacyColumn`: a switch's swap and contract, as migration operations.
- `IrreversibleStep`: operations that must never be undone (dropping the legacy column).
- `CreateVectorExtension`: pgvector's extension, with an error naming the fix when it is missing.
"""
import copy
import json
import logging
import threading
from contextlib import contextmanager
from datetime import timedelta

import psycopg2
from django.contrib.postgres import operations as postgres_operations
from django.core.management.base import CommandError
from django.db import migrations
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.operations.base import Operation
from django.db.utils import DatabaseError, ProgrammingError
from pgvector.django import HnswIndex, VectorExtension

from askdrchaffee import postgres
from askdrchaffee.postgres import QUERY_CANCELED, QUERY_SHOWN, shown_query
from segments import index_build

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between two looks at what a concurrent build waits for
WATCHER_NAME = "segments index build watcher"  # its application_name in pg_stat_activity


class MigrationLocked(CommandError):
    """A migration or step gave up waiting for its lock; nothing was changed."""


class LockRetryingExecutor(MigrationExecutor):
    """A MigrationExecutor that runs each atomic migration under lock retries (module docstring)."""

    def apply_migration(self, state, migration, fake=False, fake_initial=False):
        if fake or not migration.atomic:
            return super().apply_migration(state, migration, fake, fake_initial)
        run = super().apply_migration
        return self._retrying(migration, lambda timeout: run(state.clone(), _under(migration, timeout),
                                                              fake, fake_initial))

    def unapply_migration(self, state, migration, fake=False):
        if fake or not migration.atomic:
            return super().unapply_migration(state, migration, fake)
        run = super().unapply_migration
        return self._retrying(migration, lambda timeout: run(state.clone(), _under(migration, timeout), fake))

    def _retrying(self, migration, attempt):
        what = f"Migration {migration.app_label}.{migration.name}"
        with giving_up_on_locks():
            return postgres.with_lock_retries(attempt, what=what, holders=lambda: segments_lock_holders(self.connection))


def _under(migration, lock_timeout):
    """A copy of `migration` whose first statement, in its transaction, is SET LOCAL lock_timeout."""
    bound = copy.copy(migration)

    def apply(project_state, schema_editor, collect_sql=False):
        schema_editor.execute("SET LOCAL lock_timeout = %s", [lock_timeout])
        return type(migration).apply(bound, project_state, schema_editor, collect_sql)

    def unapply(project_state, schema_editor, collect_sql=False):
        schema_editor.execute("SET LOCAL lock_timeout = %s", [lock_timeout])
        return type(migration).unapply(bound, project_state, schema_editor, collect_sql)

    bound.apply, bound.unapply = apply, unapply
    return bound


def segments_lock_holders(connection):
    """The sessions holding a lock on segments (Django connection `connection`), described."""
    with connection.cursor() as cursor:
        return postgres.lock_holders(cursor, "segments")


@contextmanager
def giving_up_on_locks():
    """Turn askdrchaffee.postgres.LockNotTaken into a MigrationLocked (a CommandError: one line)."""
    try:
        yield
    except postgres.LockNotTaken as exc:
        raise MigrationLocked(str(exc)) from None


class LockTimeoutMigration(migrations.Migration):
    """A migration written to run under lock retries (LockRetryingExecutor): it must stay atomic, so
    that a lock timeout rolls back everything it did before it is tried again."""

    def __init__(self, name, app_label):
        super().__init__(name, app_label)
        if not self.atomic:
            raise ValueError(f"{app_label}.{name}: a LockTimeoutMigration must be atomic (lock retries roll it back).")


class AddIndexConcurrently(postgres_operations.AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY that survives being interrupted and run again, and that waits
    for older transactions instead of giving up (see the module's docstring). `out(line)`, when the
    command gives one, hears what the build does and waits for."""

    out = None
    bindable = ("out",)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        index = for_column_type(self.index, model, schema_editor)
        if schema_editor.collect_sql:  # sqlmigrate: the statement, as Django writes it
            schema_editor.add_index(model, index, concurrently=True)
            return
        self._ensure_not_in_transaction(schema_editor)
        create_sql = str(index.create_sql(model, schema_editor, concurrently=True))
        build_concurrently(schema_editor.connection.alias, index.name, create_sql,
                           self._plan(model, schema_editor), self.out)

    def _plan(self, model, schema_editor):
        """The build's memory and workers; sized to the graph for an HNSW index on a column."""
        with schema_editor.connection.cursor() as cursor:
            if not isinstance(self.index, HnswIndex) or not self.index.fields:
                return index_build.plan(cursor)
            column = model._meta.get_field(self.index.fields[0].lstrip("-")).column
            opclass = self.index.opclasses[0] if self.index.opclasses else None
            return index_build.plan(cursor, model._meta.db_table, column, self.index.m, opclass=opclass)


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
    wanted = storage_named(found[0]).cosine_opclass if found else configured(schema_editor.connection).cosine_opclass
    matching = index.clone()
    matching.opclasses = [wanted if opclass in COSINE_OPCLASSES else opclass for opclass in index.opclasses]
    return matching


def bind(migration, **values):
    """Give the operations of `migration` that take them these inputs (`out` for the concurrent
    builds, `inputs` for a swap). The operations are copied first: a loaded migration's list is its
    own, but the operations in it are its module's, shared by every loader of the process."""
    migration.operations = [_bound(operation, values) for operation in migration.operations]


def _bound(operation, values):
    wanted = {name: value for name, value in values.items() if name in getattr(operation, "bindable", ())}
    nested = getattr(operation, "database_operations", None)
    if not wanted and not nested:
        return operation
    operation = copy.copy(operation)
    for name, value in wanted.items():
        setattr(operation, name, value)
    if nested:
        operation.database_operations = [_bound(inner, values) for inner in nested]
    return operation


def report_builds_to(plan, out):
    """Give the concurrent builds of migration `plan` the command's output `out`."""
    for migration, _backwards in plan:
        bind(migration, out=out)


def build_concurrently(using, name, create_sql, plan, out=None):
    """Run `create_sql` (a CREATE INDEX CONCURRENTLY of index `name`) on a connection of its own,
    under `plan` (segments.index_build), saying what it chose and what it waits for. A VALID index
    of that name is kept as it is; an INVALID one, left by an interrupted build (maintained on every
    write, never used by a query), is dropped and built again."""
    say = _sayer(out)
    settings = {**plan.session_settings(), "lock_timeout": "0", "statement_timeout": "0"}
    connection = postgres.private_connection(using, f"Building index {name}", settings=settings,
                                             application_name=f"segments index build {name}")
    try:
        with connection.cursor() as cursor:
            valid = postgres.index_valid(cursor, name)
            if valid:
                return  # built by an earlier run that stopped before recording the migration
            if valid is False:
                cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {postgres.quote_ident(name)}")
            say(logging.INFO, plan.describe(f"index {name}"))
            if plan.warning:
                say(logging.WARNING, f"{name}: {plan.warning}")
            with cancelled_build(name), watching(using, connection.info.backend_pid, f"Building index {name}", say):
                cursor.execute(create_sql)
    finally:
        connection.close()


def _sayer(out):
    """say(level, message): to the log, and to `out` (a command's output) when given."""
    def say(level, message):
        logger.log(level, message)
        if out is not None:
            out(message + "\n")

    return say


@contextmanager
def cancelled_build(name):
    """Turn a cancelled build (pg_cancel_backend) into an error that says what to do."""
    try:
        yield
    except (DatabaseError, psycopg2.Error) as exc:
        if postgres.pgcode(exc) != QUERY_CANCELED:
            raise
        raise CommandError(
            f"Building index {name} was cancelled (pg_cancel_backend). Any INVALID index it left "
            "behind is dropped and built again by the next run: run the same command again."
        ) from exc


@contextmanager
def watching(using, pid, what, say):
    """While the block runs a statement on backend `pid`, a thread with a connection of its own
    reports each session the statement waits for (once per session's transaction)."""
    watcher = BuildWatcher(using, pid, what, say)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


class BuildWatcher(threading.Thread):
    """Polls pg_blocking_pids() and pg_stat_progress_create_index for backend `pid`, about once a
    second, and reports every blocking transaction once. It connects on its first look (a build
    that waits for nothing is done before then) and always closes its connection."""

    def __init__(self, alias, pid, what, say):
        super().__init__(name=f"{WATCHER_NAME} ({what})", daemon=True)
        self.alias, self.pid, self.what, self.say = alias, pid, what, say
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
                    connection = postgres.private_connection(self.alias, self.what, settings={"statement_timeout": "5s"},
                                                             application_name=WATCHER_NAME)
                self._look(connection)
        except (DatabaseError, psycopg2.Error, postgres.PoolerRefused) as exc:
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
        self.say(logging.WARNING, message)


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


class SwapEmbedding(Operation):
    """A switch's swap (segments/switch/swap.py): its next model's column `next_column` becomes
    `embedding`, `embedding` becomes `embedding_legacy`; backwards, the undo. Database only: the
    migration lists the state changes beside it (SeparateDatabaseAndState).

    `inputs` (a swap.SwapInputs) is what the operator's command gives the swap it applies: the
    pending segments it may leave (to a follower, or to the command after the commit), and the record
    to fill. A plain `migrate` never applies it (segments/switch/gate.py): the operator's command runs
    the swap as one message from lock to commit, this operation being only Django's way (tests, the demo).
    """

    reversible = True
    reduces_to_sql = False
    bindable = ("inputs",)

    def __init__(self, next_column):
        self.next_column = next_column
        self.inputs = None

    def deconstruct(self):
        return self.__class__.__qualname__, [], {"next_column": self.next_column}

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        from segments.switch import swap

        swap.swap(schema_editor, swap.Columns(self.next_column), self.inputs)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        from segments.switch import swap

        swap.unswap(schema_editor, swap.Columns(self.next_column), self.inputs)

    def describe(self):
        return f"Swap segments.{self.next_column} into embedding (embedding becomes embedding_legacy)"


class DropLegacyColumn(Operation):
    """A switch's last step (segments/switch/contract.py): the staleness trigger stops guarding
    `embedding_legacy`, and the column is dropped. Irreversible; database only."""

    reversible = False
    reduces_to_sql = False

    def deconstruct(self):
        return self.__class__.__qualname__, [], {}

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        from segments.switch import contract

        contract.drop_legacy_column(schema_editor)

    def describe(self):
        return "Drop segments.embedding_legacy (irreversible)"


class RecordSizeBefore(Operation):
    """The table's total size (heap, TOAST, indexes) as a switch begins, recorded as a SwitchEvent
    ("before"), so the saving is reported against what the operator paid for before it. It replaces
    an earlier record of the same switch (migration 0002's, taken when the bookkeeping was created,
    perhaps before the table was filled)."""

    reversible = True
    reduces_to_sql = False

    def __init__(self, switch):
        self.switch = switch

    def deconstruct(self):
        return self.__class__.__qualname__, [], {"switch": self.switch}

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        with schema_editor.connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size(c.oid), c.reltuples::bigint FROM pg_class c "
                           "WHERE c.oid = to_regclass('segments')")
            total_bytes, estimated_rows = cursor.fetchone()
            cursor.execute("DELETE FROM segments_switch_event WHERE step = 'before' AND "
                           "coalesce(details->>'switch', '1') = %s", [str(self.switch)])
            cursor.execute("INSERT INTO segments_switch_event (step, at, details) VALUES ('before', now(), %s)",
                           [json.dumps({"total_bytes": total_bytes, "estimated_rows": max(estimated_rows, 0),
                                        "switch": self.switch})])

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        pass

    def describe(self):
        return f"Record the table's size before switch {self.switch}"
