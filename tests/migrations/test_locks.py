"""Every migration of the switch gives up within lock_timeout when the table is busy, changes
nothing, and succeeds when retried."""
import time

import psycopg2
import pytest
from django.core.management import call_command
from django.db import connection

from segments.operations import MigrationLocked, index_validity

# (phase before, migration to apply)
STEPS = [
    ("legacy", "0002_embedding_384"),
    ("0002_embedding_384", "0003_embedding_384_todo_index"),
    ("expanded", "0004_embedding_384_hnsw"),
    ("indexed", "0005_swap_embedding"),
    ("swapped", "0006_drop_embedding_legacy"),
]
CONCURRENT_BUILDS = {
    "0003_embedding_384_todo_index": "segments_embedding_384_todo",
    "0004_embedding_384_hnsw": "segments_embedding_384_hnsw",
}


@pytest.fixture
def busy_session():
    """Another session with an uncommitted write on segments (ROW EXCLUSIVE lock), as the
    application has many times a second."""
    params = connection.get_connection_params()
    other = psycopg2.connect(host=params["host"], dbname=params["dbname"], user=params.get("user") or "postgres")
    yield other
    other.rollback()
    other.close()


@pytest.mark.parametrize("phase, migration", STEPS)
def test_a_busy_table_makes_the_migration_give_up_then_succeed(
    segments_at, settings, schema_dump, busy_session, phase, migration
):
    settings.MIGRATION_LOCK_TIMEOUT = "300ms"
    segments_at(phase)
    before = schema_dump()
    with busy_session.cursor() as cursor:
        cursor.execute("LOCK TABLE segments IN ROW EXCLUSIVE MODE")

    started = time.monotonic()
    with pytest.raises(MigrationLocked, match="lock_timeout=300ms"):
        call_command("migrate", "segments", migration, verbosity=0)
    assert time.monotonic() - started < 10
    if migration in CONCURRENT_BUILDS:
        # A concurrent build stopped half-way leaves an INVALID index behind...
        with connection.schema_editor() as editor:
            assert index_validity(editor, CONCURRENT_BUILDS[migration]) is False
    else:
        assert schema_dump() == before

    busy_session.rollback()
    call_command("migrate", "segments", migration, verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM django_migrations WHERE app = 'segments' ORDER BY id DESC LIMIT 1")
        assert cursor.fetchone() == (migration,)
    if migration in CONCURRENT_BUILDS:
        # ...which the retry drops and builds again.
        with connection.schema_editor() as editor:
            assert index_validity(editor, CONCURRENT_BUILDS[migration]) is True
