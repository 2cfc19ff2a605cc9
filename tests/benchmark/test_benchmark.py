"""`manage.py embedding_benchmark` against the real PostgreSQL: every suite in a tiny
configuration, its JSON, the table, --compare, --plot, the errors, and the live table untouched."""
import json
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from benchmark.scratch import scratch_schemas
from embeddings.fakes import HashingEncoder
from segments.schema import vector_columns
from tests.conftest import MINILM_PATH

pytestmark = pytest.mark.django_db(transaction=True)

# The keys the JSON output promises to scripts.
PROMISED_KEYS = {
    "encode": ["baseline_texts_per_s", "best_texts_per_s", "best_texts_per_call"],
    "db_write": ["per_row_update_rows_per_s", "bulk_update_rows_per_s", "backfill_path_rows_per_s",
                 "raw_copy_rows_per_s", "live_backfill_path_rows_per_s",
                 "live_without_legacy_index_backfill_path_rows_per_s"],
    "backfill": ["encode_texts_per_s", "backfill_rows_per_s", "ratio", "fake_encoder_rows_per_s",
                 "today_live_rows_per_s", "live_without_legacy_index_rows_per_s", "simulated_gpu_rows_per_s",
                 "live_without_legacy_index_vs_today_live", "live_without_legacy_index_vs_scratch",
                 "simulated_gpu_vs_zero_cost"],
    "search": ["p50_ms", "p95_ms", "recall_at_10", "ef_search"],
    "rerank": ["pairs_per_s"],
}
TINY = ["--rows", "200", "--texts", "8", "--texts-per-call", "4,8", "--queries", "10", "--ef-search", "10,40"]
LIVE_TEXTS = [f"live segment {i}: the patient's insulin came down on a meat-only diet" for i in range(12)] + ["  "]


def benchmark(*args):
    """Run the command with --json; (results, stderr)."""
    out, err = StringIO(), StringIO()
    call_command("embedding_benchmark", *args, "--json", stdout=out, stderr=err)
    return json.loads(out.getvalue()), err.getvalue()


def add_live_segments(texts):
    """Live segments with HashingEncoder vectors (none for blank text)."""
    vectors = HashingEncoder().encode_documents(texts)
    with connection.cursor() as cursor:
        for i, (text, vector) in enumerate(zip(texts, vectors)):
            literal = None if not text.strip() else "[" + ",".join(map(str, vector.tolist())) + "]"
            cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text, embedding) "
                           "VALUES ('live', %s, %s, %s, %s::vector)", [i, i + 1, text, literal])


def live_state():
    """Everything of the live tables a run could touch: rows with vectors, sequence, side tables."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, video_id, text, embedding::text FROM segments ORDER BY id")
        rows = cursor.fetchall()
        cursor.execute("SELECT last_value FROM segments_id_seq")
        sequence = cursor.fetchone()[0]
        cursor.execute("SELECT (SELECT count(*) FROM embeddings_quarantine), (SELECT count(*) FROM embeddings_backfill_claim)")
        side_tables = cursor.fetchone()
        cursor.execute("SELECT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE p.proname = 'segments_clear_stale_embedding'")
        trigger_functions = cursor.fetchall()
    return rows, sequence, side_tables, trigger_functions


def assert_positive_figures(results):
    for suite, keys in PROMISED_KEYS.items():
        for key in keys:
            value = results[suite][key]
            assert isinstance(value, (int, float)) and value > 0, f"{suite}.{key} = {value!r}"


@pytest.mark.slow
def test_every_suite_in_a_tiny_run_gives_its_figures_and_leaves_the_live_tables_as_they_were(settings):
    settings.RERANKER_MODEL = MINILM_PATH
    settings.RERANK_TOP_K = 8
    add_live_segments(LIVE_TEXTS)
    before = live_state()

    results, _ = benchmark(*TINY, "--model-shape", "bge-small")

    assert_positive_figures(results)
    assert results["machine"]["cpu"] and "gpu" in results["machine"]
    assert results["machine"]["pgvector"] and results["machine"]["torch"]
    assert "meaningless" in results["encode"]["model"] and results["run"]["vectors_meaningful"] is False
    assert [run["texts_per_call"] for run in results["encode"]["runs"]] == [4, 8]
    assert results["encode"]["texts_source"] == "the segments table (8 random segments)"
    for method in ("per_row_update", "bulk_update", "backfill_path", "raw_copy", "live_backfill_path",
                   "live_without_legacy_index_backfill_path"):
        assert results["db_write"][method]["rows_written"] == results["db_write"][method]["rows"] > 0
    assert results["db_write"]["rows_source"] == "13 segments from the segments table + 187 generated"
    assert set(results["db_write"]["share_of_raw_copy"]) == {
        "live_backfill_path", "live_without_legacy_index_backfill_path", "backfill_path", "per_row_update",
        "bulk_update"}
    model_run = results["backfill"]["with_model"]
    assert (model_run["rows_embedded"], model_run["rows_remaining"], model_run["rows_quarantined"]) == (8, 0, 0)
    assert results["backfill"]["with_fake_encoder"]["rows_remaining"] == 0
    production = results["backfill"]["production"]
    assert set(production) == {"today_live", "live", "live_without_legacy_index", "simulated_gpu",
                               "today_scratch", "scratch"}
    assert len({run["rows_embedded"] for run in production.values()}) == 1  # the same rows each time
    for run in production.values():
        assert run["rows_embedded"] > 190 and run["rows_remaining"] == 0
        assert set(run["stages"]) == {"claim", "encode", "write"} and run["limited_by"] in run["stages"]
    assert production["today_live"]["tuning"]["writers"] == 1 and production["live"]["tuning"]["writers"] == 2
    assert results["backfill"]["simulated_gpu_limited_by"] in {"claim", "encode", "write"}
    assert set(results["backfill"]["share_of_raw_copy"]) == set(production)
    assert results["search"]["rows"] == 200 and results["search"]["index_used"] is True
    assert 0 < results["search"]["recall_at_10"] <= 1 and results["search"]["vectors"] == "words"
    assert "perturbed row vectors" in results["search"]["query_vectors"]
    assert results["rerank"]["top_k"] == 8 and "skipped" not in results["rerank"]
    assert scratch_schemas() == []
    assert live_state() == before


def test_the_table_names_each_suite_and_compare_and_plot_use_an_earlier_run(tmp_path):
    earlier, _ = benchmark("--suite", "db-write", "--rows", "50")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(earlier))
    plot = tmp_path / "bench.png"
    out = StringIO()

    call_command("embedding_benchmark", "--suite", "db-write", "--rows", "50", "--compare", str(old),
                 "--plot", str(plot), stdout=out, stderr=StringIO())

    text = out.getvalue()
    assert "Machine:" in text and "db-write: 384-dim vectors into 50-row tables" in text
    assert "one UPDATE per row" in text and "backfill path:" in text
    lines = text.splitlines()
    production = next(i for i, line in enumerate(lines) if "live-shaped, legacy IVFFlat index" in line)
    scratch = next(i for i, line in enumerate(lines) if "scratch copy (no vector index)" in line)
    assert production < scratch  # production-shaped figures first
    assert "raw binary COPY" in text and "of raw COPY" in text
    assert "Change against the earlier run:" in text and "db_write.backfill_path_rows_per_s" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert scratch_schemas() == []


def test_compare_in_json_mode_adds_the_changes(tmp_path):
    earlier, _ = benchmark("--suite", "db-write", "--rows", "20")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(earlier))
    results, _ = benchmark("--suite", "db-write", "--rows", "20", "--compare", str(old))
    figures = {change["figure"]: change for change in results["compare"]}
    assert figures["db_write.per_row_update_rows_per_s"]["old"] == earlier["db_write"]["per_row_update_rows_per_s"]


@pytest.mark.parametrize("phase", ["legacy", "expanded"])
def test_before_the_swap_the_scratch_copies_get_the_new_column_and_the_live_table_does_not(
        segments_at, use_minilm, phase):
    segments_at(phase)
    before = vector_columns()
    results, _ = benchmark("--suite", "db-write", "--suite", "backfill", "--rows", "30", "--texts", "6")
    assert results["db_write"]["backfill_path"]["rows_written"] == 30
    assert results["backfill"]["with_model"]["rows_embedded"] == 6
    assert results["backfill"]["with_fake_encoder"]["rows_embedded"] == 30
    assert vector_columns() == before
    assert scratch_schemas() == []


def test_an_unavailable_embedding_model_is_an_error_naming_the_fix(settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.EMBEDDING_MODEL = "BAAI/bge-small-en-v1.5-not-downloaded"
    with pytest.raises(CommandError, match="--model-shape bge-small"):
        call_command("embedding_benchmark", "--suite", "encode", stdout=StringIO(), stderr=StringIO())
    assert scratch_schemas() == []


def test_a_reranker_that_cannot_be_loaded_skips_the_suite_with_the_reason(settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.RERANKER_MODEL = "BAAI/bge-reranker-base"
    results, _ = benchmark("--suite", "rerank", "--texts", "4")
    assert results["rerank"]["pairs_per_s"] is None
    assert "RERANKER_MODEL='BAAI/bge-reranker-base'" in results["rerank"]["skipped"]


def test_the_rerank_suite_times_the_configured_cross_encoder(settings):
    settings.RERANKER_MODEL = MINILM_PATH
    settings.RERANK_TOP_K = 6
    results, _ = benchmark("--suite", "rerank", "--texts", "4")
    assert results["rerank"]["model"] == MINILM_PATH
    assert results["rerank"]["pairs"] == 6 and results["rerank"]["pairs_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--rows", "5"], "--rows must be at least 10"),
    (["--texts", "0"], "--texts must be at least 1"),
    (["--ef-search", "10,2000"], "at most 1000"),
    (["--compare", "/nonexistent/old.json"], "cannot read it"),
    (["--plot", "/nonexistent/dir/plot.png"], "does not exist"),
])
def test_bad_options_are_refused_before_any_work(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("embedding_benchmark", "--suite", "db-write", *args, stdout=StringIO(), stderr=StringIO())
    assert scratch_schemas() == []


def test_a_compare_file_that_is_not_a_benchmark_result_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text("[1, 2]")
    with pytest.raises(CommandError, match="not an embedding_benchmark --json result"):
        call_command("embedding_benchmark", "--compare", str(path), stdout=StringIO(), stderr=StringIO())


def test_db_write_methods_write_the_vectors_they_are_given():
    """The three methods put exactly the given vectors on the given rows (checked on a scratch table)."""
    from benchmark import db_write
    from benchmark.scratch import scratch_schema

    with scratch_schema() as scratch, connection.cursor() as cursor:
        table = scratch.table("t")
        cursor.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, text text, embedding vector(3))")
        cursor.execute(f"INSERT INTO {table} SELECT g, 'text ' || g FROM generate_series(1, 4) g")
        ids = [1, 2, 3]
        cursor.execute(f"SELECT md5(text)::uuid FROM {table} WHERE id = ANY(%s) ORDER BY id", [ids])
        md5s = [row[0] for row in cursor.fetchall()]
        vectors = np.array([[1, 0, 0], [0, 0.5, 0], [0.25, 0.25, 1]], dtype=np.float32)
        for _, _, method, _ in db_write.METHODS:
            cursor.execute(f"UPDATE {table} SET embedding = NULL")
            method("default", table, "embedding", ids, md5s, vectors)
            cursor.execute(f"SELECT id, embedding::real[] FROM {table} ORDER BY id")
            stored = dict(cursor.fetchall())
            assert stored[4] is None, method.__name__
            for segment_id, vector in zip(ids, vectors):
                assert np.array_equal(np.array(stored[segment_id], dtype=np.float32), vector), method.__name__
    assert scratch_schemas() == []
