"""The new column as `vector(384)` or as `halfvec(384)` (settings.EMBEDDING_STORAGE): the whole
switch, the search and the checks work with either, on a table shaped like the original project's."""
import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

from embeddings.fakes import HashingEncoder
from segments import demo_data
from segments.schema import embedding_schema
from segments.search import search
from segments.storage import STORAGES
from segments.switch import preflight, steps
from segments.switch.backfill import run_backfill
from segments.switch.verify import verify
from tests.embeddings.conftest import add_segments, stored_vectors

LEGACY_BYTES = 8 + 4 * 1536  # one legacy vector(1536) value


@pytest.fixture(params=["vector", "halfvec"])
def storage(request, segments_at, settings):
    """EMBEDDING_STORAGE for the test; the table is rebuilt at the final phase with the default
    storage after it (settings are restored before segments_at rebuilds)."""
    settings.EMBEDDING_STORAGE = request.param
    return request.param


def column_type(column):
    with connection.cursor() as cursor:
        cursor.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = 'segments'::regclass AND attname = %s AND NOT attisdropped", [column])
        return cursor.fetchone()[0]


def index_definition(name):
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [name])
        return cursor.fetchone()[0]


def median_value_bytes(column):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY pg_column_size({column})) "
                       f"FROM segments WHERE {column} IS NOT NULL")
        return cursor.fetchone()[0]


def expected_values(encoder, storage):
    """What the column must hold for each text: the model's float32 vector, or its float16 rounding."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        rows = cursor.fetchall()
    vectors = np.asarray(encoder.encode_documents([text for _, text in rows]), dtype=np.float32)
    if storage == "halfvec":
        vectors = vectors.astype(np.float16).astype(np.float32)
    return {row_id: vector for (row_id, _), vector in zip(rows, vectors)}


@pytest.mark.slow
def test_the_whole_switch_with_each_storage(storage, segments_at):
    encoder, opclass = HashingEncoder(), STORAGES[storage].cosine_opclass
    segments_at("legacy")
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, 400, seed=7, legacy_column="embedding")

    call_command("migrate", verbosity=0)  # phase 1 creates the column in the configured storage
    assert column_type("embedding_384") == f"{storage}(384)"
    assert embedding_schema().vector_storage == storage

    run_backfill(encoder)  # the binary COPY in the column's own format
    stored, expected = stored_vectors("embedding_384"), expected_values(encoder, storage)
    assert {i for i, v in stored.items() if v is not None} == set(expected)
    assert all(np.array_equal(stored[i], expected[i]) for i in expected)  # exactly, after rounding

    steps.index()
    assert f"USING hnsw (embedding_384 {opclass})" in index_definition("segments_embedding_384_hnsw")
    report = verify(sample=30, encoder=encoder)
    assert {check.name: check.ok for check in report.checks if check.ok is not None} == {
        "coverage": True, "dimensions": True, "unit_norms": True, "finite": True, "degenerate": True, "model": True,
        "stale": True, "index": True, "index_used": True, "recall": True}, [c.message for c in report.checks]

    late = add_segments(["a segment that arrived after the backfill: fasting and ketones"])
    swap = steps.swap(encoder=encoder, backfill=lambda encoder: None)  # the swap embeds it after its commit
    assert swap.details["embedded_after"] == 1
    assert column_type("embedding") == f"{storage}(384)"
    assert f"USING hnsw (embedding {opclass})" in index_definition("segments_embedding_hnsw")
    assert preflight.inspect().blocking == []  # what `migrate` and `check --database default` run
    results = search("fasting and ketones", k=5, encoder=encoder)
    assert len(results.hits) == 5 and results.column == "embedding"

    steps.undo()
    assert column_type("embedding_384") == f"{storage}(384)" and embedding_schema().phase == "expanded"
    steps.swap(encoder=encoder)
    steps.contract(confirmed=True)

    assert embedding_schema().phase == "final" and column_type("embedding") == f"{storage}(384)"
    assert preflight.inspect().blocking == []
    assert median_value_bytes("embedding") == STORAGES[storage].value_bytes(384)
    final, expected = stored_vectors("embedding"), expected_values(encoder, storage)
    assert late[0] in expected and all(np.array_equal(final[i], expected[i]) for i in expected)


def test_halfvec_takes_an_eighth_of_the_legacy_vectors_space():
    assert STORAGES["halfvec"].value_bytes(384) / LEGACY_BYTES <= 0.13
    assert STORAGES["vector"].value_bytes(384) / LEGACY_BYTES == pytest.approx(0.251, abs=0.001)


def test_halfvec_on_a_pgvector_without_it_is_refused_before_phase_1(settings):
    settings.EMBEDDING_STORAGE = "halfvec"

    found = preflight.storage_findings("0.6.2", None)

    assert [(f.level, f.code) for f in found] == [(preflight.ERROR, "storage")]
    assert "EMBEDDING_STORAGE=vector" in found[0].fix
    assert preflight.storage_findings("0.7.0", None) == []


def test_a_setting_that_differs_from_the_existing_column_is_a_warning(segments_at, settings):
    settings.EMBEDDING_STORAGE = "vector"
    segments_at("expanded")  # created as vector(384)
    settings.EMBEDDING_STORAGE = "halfvec"

    found = preflight.storage_findings("0.8.1", embedding_schema())

    assert [(f.level, f.code) for f in found] == [(preflight.WARNING, "storage")]
    assert "embedding_384 is vector(384) while EMBEDDING_STORAGE=halfvec" in found[0].message
