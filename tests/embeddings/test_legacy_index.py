"""segments/switch/legacy_index.py against the real PostgreSQL: the legacy L2 IVFFlat index is found
by what it is, its evidence is read from the statistics, and it is dropped and rebuilt CONCURRENTLY
from its recorded definition."""
import numpy as np
import psycopg2
import pytest
from django.db import connection

from segments.models import SwitchEvent
from segments.switch import legacy_index
from segments.switch.steps import StepRefused
from tests.conftest import PHASES, migrate_segments

pytestmark = pytest.mark.django_db(transaction=True)


def index_definitions():
    """{name: pg_get_indexdef} of the indexes of segments."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                       "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'segments'::regclass")
        return dict(cursor.fetchall())


def legacy_vector(seed=0):
    vector = np.random.default_rng(seed).standard_normal(1536)
    return "[" + ",".join(f"{value:.6f}" for value in vector / np.linalg.norm(vector)) + "]"


def add_legacy_rows(count):
    with connection.cursor() as cursor:
        for n in range(count):
            cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text, embedding) "
                           "VALUES ('v', %s, %s, 'text', %s::vector)", [n, n + 1, legacy_vector(n)])


@pytest.fixture
def expanded(segments_at):
    segments_at("expanded")
    return index_definitions()["segments_embedding_idx"]


def test_the_index_is_found_by_method_opclass_and_column_whatever_its_name(expanded):
    with connection.cursor() as cursor:
        cursor.execute("ALTER INDEX segments_embedding_idx RENAME TO named_by_someone_else")
        cursor.execute("CREATE INDEX another_l2_index ON segments USING hnsw (embedding vector_cosine_ops)")
    found = legacy_index.evidence()
    assert found["column"] == "embedding"
    assert [index["name"] for index in found["indexes"]] == ["named_by_someone_else"]
    index = found["indexes"][0]
    assert "USING ivfflat (embedding) WITH (lists='100')" in index["definition"]  # vector_l2_ops: the default
    assert index["size_bytes"] > 0 and index["valid"] is True and index["idx_scan"] == 0


def test_a_cosine_query_never_scans_it_and_an_l2_query_is_counted(expanded):
    add_legacy_rows(3)
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        cursor.execute("EXPLAIN SELECT id FROM segments ORDER BY embedding <=> %s::vector LIMIT 1", [legacy_vector(9)])
        cosine_plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("SELECT id FROM segments ORDER BY embedding <-> %s::vector LIMIT 1", [legacy_vector(9)])
        cursor.execute("RESET enable_seqscan")
        cursor.execute("SELECT pg_stat_force_next_flush()")
    assert "segments_embedding_idx" not in cosine_plan
    assert legacy_index.evidence()["indexes"][0]["idx_scan"] == 1


def test_drop_records_the_exact_definition_then_drops_the_index(expanded):
    lines = []
    dropped = legacy_index.drop(stdout=lines.append)
    assert [index.name for index in dropped] == ["segments_embedding_idx"]
    assert "segments_embedding_idx" not in index_definitions()
    event = SwitchEvent.objects.get(step=legacy_index.DROPPED)
    assert event.details["definition"] == expanded and event.details["column"] == "embedding"
    assert "rebuild-legacy-index" in lines[-1]
    assert legacy_index.drop(stdout=lines.append) == [] and "nothing to drop" in lines[-1]
    assert SwitchEvent.objects.filter(step=legacy_index.DROPPED).count() == 1


def test_rebuild_builds_the_recorded_definition_again_and_then_has_nothing_to_do(expanded):
    add_legacy_rows(5)
    legacy_index.drop()
    built = legacy_index.rebuild()
    assert built.name == "segments_embedding_idx" and built.valid
    assert index_definitions()["segments_embedding_idx"] == expanded
    assert SwitchEvent.objects.filter(step=legacy_index.REBUILT).count() == 1
    lines = []
    assert legacy_index.rebuild(stdout=lines.append) is None and "nothing to rebuild" in lines[-1]


def test_an_invalid_leftover_of_an_interrupted_build_is_replaced(expanded):
    legacy_index.drop()
    with connection.cursor() as cursor:  # what an interrupted CREATE INDEX CONCURRENTLY leaves
        cursor.execute(expanded)
        cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'segments_embedding_idx'::regclass")
    built = legacy_index.rebuild()
    assert built.valid and index_definitions()["segments_embedding_idx"] == expanded


def test_rebuild_without_a_recorded_drop_names_the_fix(expanded):
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX segments_embedding_idx")
    with pytest.raises(legacy_index.LegacyIndexError, match="drop-legacy-index` records one"):
        legacy_index.rebuild()


def test_after_the_swap_it_is_rebuilt_on_the_renamed_legacy_column(expanded):
    legacy_index.drop()
    migrate_segments(PHASES["swapped"])
    built = legacy_index.rebuild()
    assert built.column == "embedding_legacy"
    assert "USING ivfflat (embedding_legacy) WITH (lists='100')" in index_definitions()[built.name]


def test_a_busy_table_makes_the_drop_give_up_and_leaves_the_index_and_no_record(expanded, settings):
    settings.MIGRATION_LOCK_TIMEOUT = "200ms"
    settings.MIGRATION_LOCK_RETRY_SECONDS = 1
    params = connection.get_connection_params()
    other = psycopg2.connect(host=params["host"], dbname=params["dbname"], user=params.get("user") or "postgres")
    try:
        with other.cursor() as cursor:  # a long maintenance command (VACUUM, an index build) holds this
            cursor.execute("LOCK TABLE segments IN SHARE UPDATE EXCLUSIVE MODE")
        with pytest.raises(legacy_index.LegacyIndexError, match="embedding_switch drop-legacy-index` again"):
            legacy_index.drop()
    finally:
        other.rollback()
        other.close()
    assert "segments_embedding_idx" in index_definitions()
    assert not SwitchEvent.objects.filter(step=legacy_index.DROPPED).exists()


def test_the_step_without_confirm_shows_the_evidence_and_drops_nothing(expanded):
    with pytest.raises(StepRefused) as refused:
        legacy_index.drop_step(confirmed=False)
    message = str(refused.value)
    assert "segments_embedding_idx on segments.embedding" in message and "never scanned" in message
    assert "--confirm" in message and "segments_embedding_idx" in index_definitions()
    result = legacy_index.drop_step(confirmed=True)
    assert result.done and result.details["dropped"][0]["definition"] == expanded
