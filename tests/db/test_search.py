"""segments.search on the real table: hand-checkable order and distances, the index, filters, phases."""
import math

import numpy as np
import pytest
from django.db import connection

from embeddings.ledger import ModelMismatch
from segments.models import Segment
from tests.conftest import stored_distance
from tests.db.vectors import DIMS, MappedEncoder, record_hand_made, vec
from segments.schema import SchemaNotReady
from segments.search import SearchError, explain_nearest, nearest, search



EAST = MappedEncoder({"east": vec(1, 0), "north": vec(0, 1)})


def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only.

    A rolled-back row keeps its node in an HNSW graph until VACUUM; a test database reused by
    many tests collects hundreds, which can leave a few hand-made vectors unreachable.
    """
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


def add(text, vector, video_id="v1", speaker="Chaffee", video_type="interview", start=0.0):
    return Segment.objects.create(video_id=video_id, start_sec=start, end_sec=start + 5, text=text,
                                  speaker_label=speaker, video_type=video_type, embedding=vector)


@pytest.fixture
def compass(db):
    """Four segments at known angles from "east": distances 0, 0.2, 1 and 2, plus a blank one."""
    segments = {
        "east": add("due east", vec(1, 0), video_id="v1"),
        "east-north-east": add("a little north of east", vec(0.8, 0.6), video_id="v2", speaker="Guest"),
        "north": add("due north", vec(0, 1), video_id="v1", video_type="podcast"),
        "west": add("due west", vec(-1, 0), video_id="v2"),
        "blank": add("   ", None, video_id="v1"),
    }
    record_hand_made()
    rebuild_vector_index()
    return segments


def ids(results):
    return [hit.segment.pk for hit in results]


def test_results_come_nearest_first_with_their_cosine_distances(compass):
    results = search("east", k=10, encoder=EAST)

    assert ids(results) == [compass[name].pk for name in ("east", "east-north-east", "north", "west")]
    expected = [stored_distance(vec(1, 0), v) for v in (vec(1, 0), vec(0.8, 0.6), vec(0, 1), vec(-1, 0))]
    assert [hit.distance for hit in results] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.0, 0.2, 1.0, 2.0], abs=2e-4)  # exactly so in float32
    assert results.column == "embedding" and results.phase == "final" and not results.reranked


def test_k_limits_the_results_and_segments_without_vectors_never_appear(compass):
    assert ids(search("north", k=2, encoder=EAST)) == [compass["north"].pk, compass["east-north-east"].pk]
    assert compass["blank"].pk not in ids(search("north", k=10, encoder=EAST))


def test_filters_keep_only_matching_segments_in_distance_order(compass):
    by_video = search("east", k=10, video_id="v2", encoder=EAST)
    by_speaker = search("east", k=10, speaker="Guest", encoder=EAST)
    by_type = search("east", k=10, video_type="podcast", encoder=EAST)

    assert ids(by_video) == [compass["east-north-east"].pk, compass["west"].pk]
    assert ids(by_speaker) == [compass["east-north-east"].pk]
    assert ids(by_type) == [compass["north"].pk]


def test_loaded_segments_carry_no_vector(compass):
    segment = search("east", k=1, encoder=EAST).hits[0].segment

    assert "embedding" in segment.get_deferred_fields()


def test_the_cosine_order_can_be_served_by_the_hnsw_index(compass):
    # The table is too small for the planner to prefer the index on its own: with sequential
    # scans disabled, a query the index cannot serve (another operator) would still seq-scan.
    plan = explain_nearest(vec(1, 0), k=10, column="embedding", allow_seqscan=False)

    assert "Index Scan using segments_embedding_hnsw on segments" in plan


def _fill_random(count, videos):
    """`count` segments with random unit vectors, spread evenly over `videos` video ids."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO segments (video_id, start_sec, end_sec, text, embedding)
            SELECT 'video-' || (g %% %s), g, g + 1, 'segment ' || g,
                   l2_normalize((SELECT array_agg(random() - 0.5) FROM generate_series(1, %s) WHERE g > 0)::vector)
            FROM generate_series(1, %s) g
            """,
            [videos, DIMS, count],
        )
        cursor.execute("ANALYZE segments")
    record_hand_made()


def _hnsw_index():
    """The model's HNSW index, with the operator class of the column's type (as the build chooses it)."""
    from segments.operations import for_column_type

    index = next(index for index in Segment._meta.indexes if index.name == "segments_embedding_hnsw")
    with connection.schema_editor() as editor:
        return for_column_type(index, Segment, editor)


def test_the_planner_uses_the_hnsw_index_for_the_search_on_a_real_sized_table(db):
    # Build the index over the filled table (as `embedding_switch index` does): much faster than inserting
    # thousands of rows into the graph one by one.
    with connection.schema_editor() as editor:
        editor.remove_index(Segment, _hnsw_index())
    _fill_random(6000, videos=3)
    with connection.schema_editor() as editor:
        editor.add_index(Segment, _hnsw_index())

    plan = explain_nearest(vec(1, 0), k=10, column="embedding")

    assert "Index Scan using segments_embedding_hnsw on segments" in plan


def _force_index_plans():
    """Make the planner take the HNSW path it takes on a large table (for this test's transaction)."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off")


def test_a_selective_filter_still_returns_k_rows(db):
    _fill_random(1000, videos=20)  # 50 segments per video
    _force_index_plans()
    query = np.random.default_rng(7).normal(size=DIMS).astype(np.float32)
    filters = {"video_id": "video-3"}
    plan = explain_nearest(query, k=10, column="embedding", filters=filters, ef_search=10)
    assert "Index Scan using segments_embedding_hnsw" in plan  # the filter runs on the index's output

    rows = nearest(query, k=10, column="embedding", filters=filters, ef_search=10)
    without_iterative_scan = nearest(query, k=10, column="embedding", filters=filters, ef_search=10,
                                     iterative=False)

    assert len(rows) == 10 and {row.video_id for row in rows} == {"video-3"}
    assert [row.distance for row in rows] == sorted(row.distance for row in rows)
    assert len(without_iterative_scan) < 10  # what the iterative scan saves the search from


def test_ef_search_is_never_below_k(db):
    _fill_random(200, videos=1)
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")  # no dead rows from earlier tests in the graph
    _force_index_plans()

    rows = nearest(vec(1, 0), k=25, column="embedding", ef_search=1, iterative=False)
    results = search("east", k=25, ef_search=1, encoder=EAST)

    # A plain HNSW scan returns at most ef_search rows: with ef_search=1 it would return one.
    assert len(rows) == 25
    assert len(results) == 25 and results.ef_search == 25


def test_ef_search_defaults_to_the_setting(compass, settings):
    settings.HNSW_EF_SEARCH = 64

    assert search("east", k=3, encoder=EAST).ef_search == 64


@pytest.mark.parametrize("kwargs, message", [
    ({"query": "  "}, "query is empty"),
    ({"query": "east", "k": 0}, "between 1 and 1000"),
    ({"query": "east", "ef_search": 5000}, "between 1 and 1000"),
    ({"query": "east", "column": "nope"}, "no vector column 'nope'"),
])
def test_requests_that_cannot_run_say_what_to_change(compass, kwargs, message):
    with pytest.raises(SearchError, match=message):
        search(encoder=EAST, **kwargs)


def _write_vector(cursor, column, segment_id, vector):
    cursor.execute(f"UPDATE segments SET {column} = %s::vector WHERE id = %s",
                   ["[" + ",".join(map(str, vector)) + "]", segment_id])


def _add_raw(cursor, text, video_id="v1"):
    cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES (%s, 0, 1, %s) RETURNING id",
                   [video_id, text])
    return cursor.fetchone()[0]


def test_before_the_swap_the_search_runs_on_the_new_column(segments_at):
    segments_at("expanded")
    with connection.cursor() as cursor:
        east, north, legacy_only = (_add_raw(cursor, text) for text in ("east", "north", "legacy only"))
        _write_vector(cursor, "embedding_384", east, vec(1, 0))
        _write_vector(cursor, "embedding_384", north, vec(0.6, 0.8))
        _write_vector(cursor, "embedding", legacy_only, np.ones(1536) / math.sqrt(1536))
    record_hand_made("embedding_384")

    results = search("east", k=10, encoder=EAST)

    assert results.column == "embedding_384" and results.phase == "expanded"
    assert ids(results) == [east, north]
    expected = [stored_distance(vec(1, 0), v, "embedding_384") for v in (vec(1, 0), vec(0.6, 0.8))]
    assert [hit.distance for hit in results] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx([0.0, 0.4], abs=2e-4)
    assert any("before the swap" in note for note in results.notes)
    assert any("no HNSW index" in note and "embedding_switch index" in note for note in results.notes)


def test_after_the_swap_the_search_runs_on_embedding_with_its_renamed_index(segments_at):
    segments_at("swapped")
    with connection.cursor() as cursor:
        east, north = (_add_raw(cursor, text) for text in ("east", "north"))
        _write_vector(cursor, "embedding", east, vec(1, 0))
        _write_vector(cursor, "embedding", north, vec(0, 1))
    record_hand_made()

    results = search("north", k=10, encoder=EAST)
    plan = explain_nearest(vec(1, 0), k=10, column="embedding", allow_seqscan=False)

    assert (results.column, results.phase, results.notes) == ("embedding", "swapped", [])
    assert ids(results) == [north, east]
    assert "Index Scan using segments_embedding_hnsw on segments" in plan


def test_the_new_columns_index_serves_the_search_before_the_swap(segments_at):
    segments_at("indexed")

    plan = explain_nearest(vec(1, 0), k=10, column="embedding_384", allow_seqscan=False)

    assert "Index Scan using segments_embedding_384_hnsw on segments" in plan


def test_the_legacy_column_is_not_searched_with_another_model_naming_both(segments_at):
    segments_at("expanded")

    with pytest.raises(ModelMismatch, match=r"segments.embedding holds the vectors of the original project's model "
                                            r"\(Alibaba-NLP/gte-Qwen2-1.5B-instruct\).*uses vectors chosen by the test "
                                            r"\(hand-made vectors\).*No question was embedded"):
        search("east", column="embedding", encoder=EAST)


def test_the_replaced_models_column_without_an_hnsw_index_is_scanned_and_no_step_is_offered(segments_at):
    from segments.schema import embedding_schema
    from segments.search import _notes

    segments_at("expanded")  # embedding: the legacy column, with only the original project's L2 index

    legacy = _notes(embedding_schema(), "embedding", filtered=False, iterative=True, using="default")
    new = _notes(embedding_schema(), "embedding_384", filtered=False, iterative=True, using="default")

    assert legacy == ["segments.embedding has no HNSW index: this search scanned the whole table (exact, and "
                      "slower on a large table)."]
    assert any("embedding_switch index" in note for note in new)


def test_before_phase_one_the_search_names_the_migration(segments_at):
    segments_at("legacy")

    with pytest.raises(SchemaNotReady, match=r"Apply phase 1 first: `manage.py migrate`"):
        search("east", encoder=EAST)
