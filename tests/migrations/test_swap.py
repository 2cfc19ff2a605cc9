"""Phase 3b: the guarded swap, its reverse, and the final drop."""
import threading

import pytest
from django.db import connection, connections

from segments import demo_data
from segments.schema import embedding_schema
from segments.switch.swap import SwapRefused
from tests.conftest import PHASES, migrate_segments

ONE_HOT = "'[1" + ",0" * 383 + "]'"


def load(sql, count, with_vectors=True):
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, count, seed=1, legacy_column="embedding")
    if with_vectors:
        sql(f"UPDATE segments SET embedding_384 = {ONE_HOT} WHERE text ~ '[^[:space:]]'")


def test_swap_refuses_while_a_segment_lacks_its_vector_and_changes_nothing(segments_at, sql, schema_dump):
    segments_at("indexed")
    load(sql, 80)
    sql("UPDATE segments SET embedding_384 = NULL WHERE id IN (SELECT id FROM segments ORDER BY id LIMIT 3)")
    before = schema_dump()

    with pytest.raises(SwapRefused, match=r"3 segment\(s\) with text have no vector of the new model.*embedding_switch swap"):
        migrate_segments(PHASES["swapped"])

    assert schema_dump() == before
    assert embedding_schema().phase == "expanded"


def test_swap_refuses_while_rows_are_quarantined(segments_at, sql):
    segments_at("indexed")
    load(sql, 20)
    (segment_id,), = sql("SELECT id FROM segments ORDER BY id LIMIT 1")
    sql("UPDATE segments SET embedding_384 = NULL WHERE id = %s", [segment_id])
    sql("INSERT INTO embeddings_quarantine (segment_id, text_md5, reason, attempts, first_failed_at, last_failed_at) "
        "SELECT id, md5(text)::uuid, 'non-finite vector', 1, now(), now() FROM segments WHERE id = %s", [segment_id])

    with pytest.raises(SwapRefused, match=r"1 segment\(s\) with text are quarantined.*--retry-quarantined"):
        migrate_segments(PHASES["swapped"])


def test_blank_segments_do_not_hold_the_swap_back(segments_at, sql):
    segments_at("indexed")
    load(sql, 10)
    sql("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES ('v', 0, 1, ''), ('v', 1, 2, E' \\t\\n ')")
    migrate_segments(PHASES["swapped"])
    assert embedding_schema().phase == "swapped"


def test_swap_and_its_reverse_round_trip(segments_at, sql, schema_dump):
    segments_at("indexed")
    load(sql, 50)
    before_schema = schema_dump()
    before_rows = sql("SELECT id, text, embedding::text, embedding_384::text FROM segments ORDER BY id")

    migrate_segments(PHASES["swapped"])
    schema = embedding_schema()
    assert (schema.phase, schema.vector_dimensions, schema.legacy_dimensions) == ("swapped", 384, 1536)
    assert sql("SELECT id, text, embedding_legacy::text, embedding::text FROM segments ORDER BY id") == before_rows
    indexes = {name for (name,) in sql("SELECT indexname FROM pg_indexes WHERE tablename = 'segments'")}
    assert {"segments_embedding_hnsw", "segments_embedding_todo", "segments_embedding_legacy_idx"} <= indexes
    # The staleness trigger now guards the live column, and the legacy one (an undo must not serve it).
    (segment_id,), = sql("SELECT id FROM segments ORDER BY id LIMIT 1")
    sql("UPDATE segments SET text = 'changed' WHERE id = %s", [segment_id])
    assert sql("SELECT embedding IS NULL, embedding_legacy IS NULL FROM segments WHERE id = %s", [segment_id]) == [(True, True)]
    sql(f"UPDATE segments SET text = %s, embedding = {ONE_HOT}, embedding_legacy = %s::vector WHERE id = %s",
        [before_rows[0][1], before_rows[0][2], segment_id])

    migrate_segments(PHASES["indexed"])
    assert schema_dump() == before_schema
    assert sql("SELECT id, text, embedding::text, embedding_384::text FROM segments ORDER BY id") == before_rows


def test_dropping_the_legacy_column_is_the_one_irreversible_step(segments_at, sql):
    from django.db.migrations.exceptions import IrreversibleError

    segments_at("swapped")
    migrate_segments(PHASES["final"])
    assert embedding_schema().phase == "final"
    with pytest.raises(IrreversibleError):
        migrate_segments(PHASES["swapped"])


@pytest.mark.slow
def test_application_writes_during_the_index_build_all_succeed(segments_at, sql):
    """A writer inserts, edits and deletes segments while the index is built (the swap under
    writes is tested in test_live_swap.py)."""
    segments_at("expanded")
    load(sql, 3000)
    done, errors, writes = threading.Event(), [], []

    def writer():
        cursor = connections["default"].cursor()  # this thread's own connection
        try:
            i = 0
            while not done.is_set():
                i += 1
                cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) "
                               "VALUES ('live', %s, %s, %s) RETURNING id", [i, i + 1, f"new segment {i}"])
                (new_id,) = cursor.fetchone()
                cursor.execute("UPDATE segments SET text = text || ' (edited)' WHERE id = %s", [new_id - 1])
                if i % 5 == 0:
                    cursor.execute("DELETE FROM segments WHERE id = %s", [new_id - 2])
                writes.append(new_id)
        except Exception as exc:  # recorded, and the test fails on it below
            errors.append(exc)
        finally:
            connections["default"].close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        migrate_segments(PHASES["indexed"])
        done.set()
        thread.join()
        sql(f"UPDATE segments SET embedding_384 = {ONE_HOT} WHERE embedding_384 IS NULL AND text ~ '[^[:space:]]'")
        migrate_segments(PHASES["swapped"])
    finally:
        done.set()
        thread.join()

    assert errors == []
    assert len(writes) > 10
    assert sql("SELECT count(*) FROM segments WHERE video_id = 'live'")[0][0] == len(writes) - len(writes) // 5
    assert sql("SELECT count(*) FROM segments WHERE embedding IS NULL AND text ~ '[^[:space:]]'") == [(0,)]
