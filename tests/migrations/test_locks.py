"""Every migration of the switch that takes a lock the application would queue behind (the
ACCESS EXCLUSIVE of the atomic migrations) tries for it in short attempts; when the table stays
busy longer than MIGRATION_LOCK_RETRY_SECONDS it gives up, changes nothing, names the transaction
that held the lock, and succeeds when run again. The concurrent index builds wait instead: see
test_concurrent_build.py; the application's waits: test_lock_queue.py."""
import time

import psycopg2
import pytest
from django.db import connection

from segments.operations import MigrationLocked
from tests.conftest import migrate_segments

# (phase before, migration to migrate to); ("swapped", "0006_...") is the undo of the swap.
ATOMIC_STEPS = [
    ("0002_switch_bookkeeping", "0003_embedding_384"),
    ("indexed", "0007_swap_embedding"),
    ("swapped", "0006_embedding_384_hnsw"),
    ("swapped", "0008_drop_embedding_legacy"),
]


@pytest.fixture
def busy_session():
    """Another session with an uncommitted write on segments (ROW EXCLUSIVE lock), as the
    application has many times a second."""
    params = connection.get_connection_params()
    other = psycopg2.connect(host=params["host"], dbname=params["dbname"], user=params.get("user") or "postgres")
    yield other
    other.rollback()
    other.close()


@pytest.mark.parametrize("phase, migration", ATOMIC_STEPS)
def test_a_busy_table_makes_an_atomic_migration_give_up_unchanged_then_succeed(
    segments_at, settings, schema_dump, busy_session, phase, migration
):
    settings.MIGRATION_LOCK_TIMEOUT = "300ms"
    settings.MIGRATION_LOCK_RETRY_SECONDS = 1.5
    segments_at(phase)
    before = schema_dump()
    with busy_session.cursor() as cursor:
        cursor.execute("LOCK TABLE segments IN ROW EXCLUSIVE MODE")

    started = time.monotonic()
    with pytest.raises(MigrationLocked) as refused:
        migrate_segments(migration)
    assert time.monotonic() - started < 10
    assert schema_dump() == before
    assert f"held by pid {busy_session.info.backend_pid} (idle in transaction" in str(refused.value)
    assert "each waiting at most 300 ms for its lock" in str(refused.value)
    assert "Nothing was changed" in str(refused.value)

    busy_session.rollback()
    migrate_segments(migration)
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM django_migrations WHERE app = 'segments' ORDER BY id DESC LIMIT 1")
        assert cursor.fetchone() == (migration,)
