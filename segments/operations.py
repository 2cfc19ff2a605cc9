"""Migration building blocks for changing a live table without blocking its traffic.

- `LockTimeoutMigration`: every statement of the migration runs under `lock_timeout`, so a
  migration that cannot get its lock gives up quickly (and changes nothing) instead of queueing
  the application's queries behind it.
- `AddIndexConcurrently`: Django's, made safe to re-run: a VALID index of the same name is
  kept, an INVALID one (left by an interrupted build) is dropped and built again, and the build
  runs with `maintenance_work_mem` raised to settings.INDEX_MAINTENANCE_WORK_MEM and gives up
  under lock_timeout like the rest.
- `IrreversibleStep`: operations that must never be undone (dropping the legacy column).
- `CreateVectorExtension`: pgvector's extension, with an error naming the fix when it is missing.
"""
from contextlib import contextmanager

from django.conf import settings
from django.contrib.postgres import operations as postgres_operations
from django.core.management.base import CommandError
from django.db import migrations
from django.db.utils import OperationalError, ProgrammingError
from pgvector.django import VectorExtension

LOCK_NOT_AVAILABLE = "55P03"


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
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = %s AND pg_catalog.pg_table_is_visible(c.oid)",
            [name],
        )
        row = cursor.fetchone()
    return None if row is None else row[0]


class AddIndexConcurrently(postgres_operations.AddIndexConcurrently):
    """CREATE INDEX CONCURRENTLY that survives being interrupted and run again."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        # Session settings (the migration is not atomic), restored whatever happens. A
        # concurrent build waits for transactions writing the table; lock_timeout bounds that
        # wait, and a build interrupted that way leaves an INVALID index the next run rebuilds.
        schema_editor.execute("SET maintenance_work_mem = %s", [settings.INDEX_MAINTENANCE_WORK_MEM])
        schema_editor.execute("SET lock_timeout = %s", [settings.MIGRATION_LOCK_TIMEOUT])
        try:
            with giving_up_on_lock_timeout(f"Building index {self.index.name}"):
                self._build(app_label, schema_editor, from_state, to_state)
        finally:
            schema_editor.execute("RESET maintenance_work_mem; RESET lock_timeout")

    def _build(self, app_label, schema_editor, from_state, to_state):
        valid = index_validity(schema_editor, self.index.name)
        if valid:
            return  # built by an earlier run that stopped before recording the migration
        if valid is False:
            # An interrupted CONCURRENTLY build leaves an INVALID index that is maintained on
            # every write but never used by a query: drop it and build it again.
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {schema_editor.quote_name(self.index.name)}")
        super().database_forwards(app_label, schema_editor, from_state, to_state)


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
