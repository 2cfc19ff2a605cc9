"""Every migration of the switch that takes a lock the application would queue behind (the
ACCESS EXCLUSIVE of the atomic migrations) gives up within lock_timeout when the table is busy,
changes nothing, and succeeds when retried. The concurrent index builds wait instead: see
test_concurrent_build.py."""
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
    segments_at(phase)
    before = schema_dump()
    with busy_session.cursor() as cursor:
        cursor.execute("LOCK TABLE segments IN ROW EXCLUSIVE MODE")

    started = time.monotonic()
    with pytest.raises(MigrationLocked, match="lock_timeout=300ms"):
        migrate_segments(migration)
    assert time.monotonic() - started < 10
    assert schema_dump() == before

    busy_session.rollback()
    migrate_segments(migration)
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM django_migrations WHERE app = 'segments' ORDER BY id DESC LIMIT 1")
        assert cursor.fetchone() == (migration,)
