"""Phase 1: the new column and its staleness trigger, reversible, invisible to the application."""
import numpy as np
import pytest
from django.core.management import call_command

from tests.conftest import PHASES

LEGACY_INSERT = (
    "INSERT INTO segments (video_id, start_sec, end_sec, text, speaker_label, embedding) "
    "VALUES (%s, 0, 1.5, %s, 'Chaffee', %s) RETURNING id"
)


def vector_literal(values):
    return "[" + ",".join(f"{v:.6f}" for v in values) + "]"


def test_migrating_back_to_0001_restores_the_schema_exactly(segments_at, schema_dump):
    segments_at("legacy")
    before = schema_dump()
    call_command("migrate", "segments", PHASES["expanded"], verbosity=0)
    assert schema_dump() != before
    call_command("migrate", "segments", "0001", verbosity=0)
    assert schema_dump() == before


@pytest.mark.parametrize("phase", ["legacy", "expanded", "indexed"])
def test_the_applications_plain_sql_writes_keep_working(segments_at, sql, phase):
    segments_at(phase)
    legacy_vector = vector_literal(np.full(1536, 1 / np.sqrt(1536)))
    (segment_id,), = sql(LEGACY_INSERT, ["vid00000001", "Ketosis and insulin.", legacy_vector])
    sql("UPDATE segments SET text = 'Ketosis, insulin and fasting.', speaker_label = 'GUEST' WHERE id = %s", [segment_id])
    sql("DELETE FROM segments WHERE id = %s", [segment_id])
    assert sql("SELECT count(*) FROM segments") == [(0,)]


def test_a_text_change_clears_the_new_vector_but_not_a_vector_written_with_it(segments_at, sql):
    segments_at("expanded")
    (segment_id,), = sql(LEGACY_INSERT, ["vid00000001", "Red meat and LDL.", None])
    unit = vector_literal(np.eye(384)[0])
    sql("UPDATE segments SET embedding_384 = %s WHERE id = %s", [unit, segment_id])

    sql("UPDATE segments SET speaker_label = 'GUEST' WHERE id = %s", [segment_id])
    assert sql("SELECT embedding_384 IS NOT NULL FROM segments") == [(True,)]
    sql("UPDATE segments SET text = text WHERE id = %s", [segment_id])
    assert sql("SELECT embedding_384 IS NOT NULL FROM segments") == [(True,)]

    sql("UPDATE segments SET text = 'Red meat and HDL.' WHERE id = %s", [segment_id])
    assert sql("SELECT embedding_384 IS NULL FROM segments") == [(True,)]

    sql("UPDATE segments SET text = 'Red meat.', embedding_384 = %s WHERE id = %s", [unit, segment_id])
    assert sql("SELECT embedding_384::text FROM segments") == [("[1" + ",0" * 383 + "]",)]
