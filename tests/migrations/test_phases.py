import pytest

from segments.schema import embedding_schema


@pytest.mark.parametrize(
    "phase, vector_column, legacy_column",
    [
        ("legacy", None, "embedding"),
        ("expanded", "embedding_384", "embedding"),
        ("swapped", "embedding", "embedding_legacy"),
        ("final", "embedding", None),
    ],
)
def test_each_phase_is_detected_from_the_catalogue(segments_at, phase, vector_column, legacy_column):
    segments_at(phase)
    schema = embedding_schema()
    assert (schema.phase, schema.vector_column, schema.legacy_column) == (phase, vector_column, legacy_column)
