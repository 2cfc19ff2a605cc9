"""The search suite's vector and halfvec tables, derived vectors, filtered searches and JSON figures,
against the real PostgreSQL + pgvector and, where the vectors' meaning matters, the real model."""
import json
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from benchmark import derived, filtered, search_sets, search_tables
from benchmark.scratch import scratch_schema, scratch_schemas
from segments.demo_data import generate_texts
from tests.conftest import as_stored

pytestmark = pytest.mark.django_db(transaction=True)


def unit_vectors(count, dims=384, seed=0):
    return derived.normalise(np.random.default_rng(seed).standard_normal((count, dims), dtype=np.float32))


def read_back(cursor, table):
    cursor.execute(f"SELECT id, embedding::real[] FROM {table} ORDER BY id")
    return np.array([values for _, values in cursor.fetchall()], dtype=np.float32)


def test_a_halfvec_binary_copy_reads_back_as_the_float16_rounded_input():
    vectors = unit_vectors(50)
    vectors[0, :4] = [0.1, 1 / 3, -0.70710677, 2e-5]  # values float16 cannot hold exactly
    ids, videos = np.arange(1, 51), np.zeros(50, dtype=np.int32)
    with scratch_schema() as scratch, connection.cursor() as cursor:
        table = scratch.table("round_trip")
        search_tables.create(cursor, table, "halfvec", 384)
        search_tables.load(cursor, table, "halfvec", ids, videos, vectors)
        stored = read_back(cursor, table)
        cursor.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                       "AND attname = 'embedding'", [table])
        column_type = cursor.fetchone()[0]

    assert column_type == "halfvec(384)"
    assert np.array_equal(stored, vectors.astype(np.float16).astype(np.float32))
    assert np.array_equal(stored, search_tables.stored(vectors, "halfvec"))
    assert not np.array_equal(stored[0, :4], vectors[0, :4])  # rounded, not sent as float32
    assert scratch_schemas() == []


def test_a_vector_binary_copy_reads_back_exactly():
    vectors = unit_vectors(20, seed=1)
    with scratch_schema() as scratch, connection.cursor() as cursor:
        table = scratch.table("round_trip")
        search_tables.create(cursor, table, "vector", 384)
        search_tables.load(cursor, table, "vector", np.arange(1, 21), np.zeros(20, dtype=np.int32), vectors)
        assert np.array_equal(read_back(cursor, table), vectors)
        assert search_tables.sizes(cursor, table)["column_bytes_per_row"] == 1544  # 8 + 4 x 384


def test_live_vectors_are_read_by_binary_copy_as_the_table_holds_them():
    vectors = unit_vectors(6, seed=7)
    with connection.cursor() as cursor:
        for i, vector in enumerate(vectors):
            cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text, embedding) "
                           "VALUES ('live', %s, %s, %s, %s::vector)", [i, i + 1, f"text {i}", str(vector.tolist())])
        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES ('live', 9, 10, 'none')")
        cursor.execute("SELECT id FROM segments WHERE embedding IS NOT NULL ORDER BY id")
        expected_ids = [row_id for (row_id,) in cursor.fetchall()]

        ids, found = search_sets.read_live(cursor, "embedding", 384, 5)

    assert ids.tolist() == expected_ids[:5]  # the first rows with a vector
    assert np.array_equal(found, as_stored(vectors[:5]))


@pytest.mark.slow
def test_derived_vectors_stay_nearest_to_the_real_vector_they_came_from(minilm):
    texts = list(dict.fromkeys(generate_texts(320)))[:300]
    base = minilm.encode_documents(texts)
    rows = derived.derive(base, 1200, seed=0)
    origin = derived.origins(1200, len(base), seed=0)

    similarity = rows @ base.T
    nearest = similarity.argmax(axis=1)
    rank_of_origin = (similarity > similarity[np.arange(1200), origin][:, None]).sum(axis=1)
    real_neighbours = derived.neighbours(base, 10)[origin]

    assert rows.shape == (1200, 384) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    assert np.mean(nearest == origin) > 0.5  # by chance: 1 in 300
    assert np.mean(rank_of_origin < 10) > 0.7
    near_origin = (nearest == origin) | (real_neighbours == nearest[:, None]).any(axis=1)
    assert np.mean(near_origin) > 0.7  # the origin or one of its 10 real neighbours: 11 in 300 by chance


def test_filtered_searches_with_an_iterative_scan_return_k_rows_where_the_plain_scan_returns_fewer():
    rows = 3000
    vectors, videos = unit_vectors(rows, seed=2), filtered.assign_videos(rows, seed=0)
    queries = [f"[{','.join(map(str, query))}]" for query in unit_vectors(20, seed=3)]
    rare_video = filtered.FILTERS[1][1]
    assert 15 <= np.sum(videos == rare_video) <= 50  # ~1% of the rows: more than the 10 asked for
    counts = {}
    with scratch_schema() as scratch, connection.cursor() as cursor:
        table = scratch.table("filtered")
        search_tables.create(cursor, table, "halfvec", 384)
        search_tables.load(cursor, table, "halfvec", np.arange(1, rows + 1), videos, vectors)
        settings = search_tables.build_settings(cursor, table, rows, "halfvec", workers=0)
        search_tables.build_index(cursor, table, "halfvec", settings)
        for mode in filtered.MODES:
            statements = filtered.settings_sql(40, mode, filtered.DEFAULT_MAX_SCAN_TUPLES)
            _, found = filtered.run(cursor, table, "halfvec", queries, rare_video, statements, 10)
            assert all(video == rare_video for rows_found in found for video in
                       _videos_of(cursor, table, [row_id for row_id, _ in rows_found]))
            counts[mode] = [len(rows_found) for rows_found in found]
        assert filtered.index_used(cursor, table, "halfvec", queries[0], rare_video, 10)

    assert np.mean(counts["off"]) < 5  # ef_search 40 candidates, ~1% of them pass
    assert counts["relaxed_order"] == [10] * 20
    assert counts["strict_order"] == [10] * 20


def _videos_of(cursor, table, ids):
    cursor.execute(f"SELECT video_id FROM {table} WHERE id = ANY(%s)", [ids])
    return [video for (video,) in cursor.fetchall()]


@pytest.mark.slow
def test_the_json_output_carries_both_types_filtered_searches_and_the_derived_check(use_minilm, tmp_path):
    out = StringIO()
    call_command("embedding_benchmark", "--suite", "search", "--search-vectors", "derived", "--rows", "1200",
                 "--derive-base", "320", "--check-derived", "--queries", "20", "--ef-search", "10,40",
                 "--vector-cache", str(tmp_path), "--index-memory", "96MB", "--json", stdout=out, stderr=StringIO())
    results = json.loads(out.getvalue())["search"]

    vector, halfvec = results["types"]["vector"], results["types"]["halfvec"]
    assert (vector["type"], halfvec["type"]) == ("vector(384)", "halfvec(384)")
    assert (vector["column_bytes_per_row"], halfvec["column_bytes_per_row"]) == (1544, 776)
    assert halfvec["share_of_legacy_column"] == pytest.approx(776 / 6152)
    for figures in (vector, halfvec):
        assert figures["rows"] == 1200 and figures["load_s"] > 0 and figures["index_build_s"] > 0
        assert figures["index_build"]["maintenance_work_mem"] == 96 * 2**20
        assert figures["index_build"]["graph_fitted_in_memory"] is True
        assert [entry["ef_search"] for entry in figures["sweep"]] == [10, 40]
        assert figures["at_recall_0.98"]["ef_search"] in (10, 40)
        assert figures["filtered"]["modes"] == ["off", "relaxed_order", "strict_order"]
        rare = figures["filtered"]["filters"][1]
        assert rare["rows_expected"] == min(10, rare["rows_matching"])
        assert rare["modes"]["relaxed_order"]["rows_min"] == rare["rows_expected"]
        assert 0 <= rare["modes"]["off"]["rows_mean"] <= rare["modes"]["strict_order"]["rows_mean"]
    assert "recall_at_10_vs_float32" in halfvec["sweep"][0]
    assert results["vectors"] == "derived" and results["vectors_details"]["base_vectors"] == 320
    assert results["p50_ms"] == vector["at_recall_0.95"]["p50_ms"]  # the top-level figures are vector's
    check = results["derived_check"]
    assert set(check["sets"]) == {"real", "derived_from_80", "derived_from_20", "random"}
    assert set(check["largest_recall_difference"]) == {"derived_from_80", "derived_from_20", "random"}
    assert {"halfvec_column_at_most_13%_of_legacy", "vector_p50_under_5_ms_at_recall_0.98",
            "halfvec_filtered_searches_return_10_rows"} <= set(results["targets"])
    assert results["targets"]["halfvec_column_at_most_13%_of_legacy"] is True
    assert len(list(tmp_path.glob("*.npy"))) == 2  # the base texts and the queries, cached
    assert scratch_schemas() == []


def test_live_vectors_asked_for_where_the_table_has_none_is_an_error_naming_the_fix():
    with pytest.raises(CommandError, match="holds no vector yet.*--search-vectors derived"):
        call_command("embedding_benchmark", "--suite", "search", "--search-vectors", "live", "--rows", "10",
                     "--model-shape", "bge-small", stdout=StringIO(), stderr=StringIO())
    assert scratch_schemas() == []


@pytest.mark.parametrize("args, message", [
    (["--check-derived"], "add --search-vectors derived"),
    (["--search-vectors", "derived", "--model-shape", "bge-small"], "needs the model's real vectors"),
    (["--search-types", "vector,bitvec"], "--search-types"),
    (["--index-memory", "lots"], "--index-memory"),
    (["--derive-base", "1"], "--derive-base must be at least 2"),
])
def test_bad_search_options_are_refused_before_any_work(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("embedding_benchmark", "--suite", "search", *args, stdout=StringIO(), stderr=StringIO())
    assert scratch_schemas() == []
