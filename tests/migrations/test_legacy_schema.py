"""Migration 0001 is the existing table, and an existing database adopts the project."""
from pathlib import Path

from django.core.management import call_command
from django.db import connection

from segments import demo_data
from segments.schema import embedding_schema
from tests.conftest import drop_segments

LEGACY_SQL = (Path(__file__).parent / "legacy_schema.sql").read_text()


def test_migration_0001_creates_exactly_the_legacy_table(segments_at, schema_dump, sql):
    segments_at("legacy")
    from_migration = schema_dump()

    drop_segments()
    sql(LEGACY_SQL)
    assert schema_dump() == from_migration


def test_existing_database_adopts_the_project_with_fake_initial(segments_at, sql):
    drop_segments()
    sql(LEGACY_SQL)
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, 60, seed=3, legacy_column="embedding")
    before = sql("SELECT id, video_id, start_sec, text, embedding::text, created_at FROM segments ORDER BY id")

    call_command("migrate", "segments", "0004", fake_initial=True, verbosity=0)

    after = sql("SELECT id, video_id, start_sec, text, embedding::text, created_at FROM segments ORDER BY id")
    assert after == before and len(after) == 60
    assert embedding_schema().phase == "expanded"
    applied = sql("SELECT name FROM django_migrations WHERE app = 'segments' ORDER BY id")
    assert [name for (name,) in applied] == [
        "0001_initial", "0002_switch_bookkeeping", "0003_embedding_384", "0004_embedding_384_todo_index",
    ]
