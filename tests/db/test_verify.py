"""`manage.py verify_embeddings`: passes on a complete table, fails loudly on each kind of damage."""
import json
from contextlib import contextmanager
from io import StringIO

import numpy as np
import psycopg2
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from segments.models import QuarantinedSegment
from segments.models import Segment
from segments.switch import verify as verify_module
from tests.conftest import MINILM_PATH, manage

TEXTS = [f"Segment {i} about {topic}." for i, topic in enumerate(
    ["fasting", "insulin", "red meat", "plant toxins", "ketones", "sleep", "cholesterol", "sugar", "salt",
     "eggs", "butter", "fish", "liver", "oxalates", "fibre", "vitamin C", "scurvy", "gout", "acne", "arthritis"] * 2)]


_encoded = {}


def encode(minilm, texts):
    """MiniLM vectors of `texts`, encoded once per test session."""
    key = tuple(texts)
    if key not in _encoded:
        _encoded[key] = minilm.encode_documents(texts)
    return _encoded[key]


def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only (see tests/db/test_search.py)."""
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


def write_segments(minilm, texts=TEXTS):
    vectors = encode(minilm, texts)
    segments = [Segment.objects.create(video_id=f"v{i % 4}", start_sec=i, end_sec=i + 1, text=text, embedding=vector)
                for i, (text, vector) in enumerate(zip(texts, vectors))]
    Segment.objects.create(video_id="v0", start_sec=99, end_sec=100, text="  ")  # blank: no vector by design
    rebuild_vector_index()
    return segments


@pytest.fixture
def complete(db, minilm):
    return write_segments(minilm)


def run(minilm, *args, sample=8):
    """(report as a dict, the CommandError or None) of `verify_embeddings --json --sample N *args`."""
    out = StringIO()
    try:
        call_command("verify_embeddings", "--json", "--sample", str(sample), *args, stdout=out, encoder=minilm)
    except CommandError as exc:
        return json.loads(out.getvalue()), exc
    return json.loads(out.getvalue()), None


def test_a_complete_table_passes_every_check(complete, minilm):
    report, error = run(minilm, sample=100)

    assert error is None and report["passed"] is True
    checks = report["checks"]
    assert [name for name in checks] == ["coverage", "dimensions", "unit_norms", "finite", "degenerate", "model",
                                         "stale", "index", "index_used", "recall"]
    assert all(check["ok"] for check in checks.values())
    assert checks["coverage"]["segments_with_text"] == len(TEXTS) and checks["coverage"]["blank"] == 1
    assert checks["stale"]["sampled"] == len(TEXTS) and checks["stale"]["min_cosine"] > 0.999
    assert checks["recall"]["recall_at_10"] == 1.0 and checks["recall"]["queries"] == len(TEXTS)
    # 40 queries at recall 1.0: the pooled neighbours' Wilson bound, 400 / (400 + 1.96²).
    assert (checks["recall"]["ci95_low"], checks["recall"]["ci95_high"]) == (pytest.approx(0.9905, abs=1e-4), 1.0)
    assert checks["recall"]["verdict"] == "pass" and checks["recall"]["budget_spent"] is False
    assert checks["recall"]["timed_out"] == 0 and checks["recall"]["sampled"] == len(TEXTS)
    assert checks["index"]["index"] == "segments_embedding_hnsw"


def test_the_text_report_names_each_check_and_the_recall_figure(complete, minilm):
    out = StringIO()
    call_command("verify_embeddings", stdout=out, encoder=minilm)

    text = out.getvalue()
    assert "Embeddings in segments.embedding (phase final)" in text
    assert ("recall@10 = 1.000, 95% interval 0.990..1.000, over 40 queries at ef_search 100: >= 0.95 with 95% "
            "confidence.") in text
    assert text.rstrip().endswith("All checks passed.")
    with connection.cursor() as cursor:  # each recall query's statement_timeout was put back
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone()[0] == "0"


def test_too_few_recall_queries_are_reported_as_not_proven_without_failing(complete, minilm):
    report, error = run(minilm, sample=5)

    recall = report["checks"]["recall"]
    assert error is None and recall["ok"] is None and recall["verdict"] == "inconclusive"
    assert recall["ci95_low"] == pytest.approx(50 / (50 + 1.96**2), abs=1e-3) and recall["ci95_high"] == 1.0
    assert "0.95 or more on average, not proven with 95% confidence" in recall["message"]
    assert "--sample, --recall-seconds" in recall["message"]


def test_a_missing_vector_fails_coverage(complete, minilm):
    Segment.objects.filter(pk=complete[3].pk).update(embedding=None)

    report, error = run(minilm)

    assert str(error) == "1 check(s) failed: coverage."
    assert report["checks"]["coverage"]["missing"] == 1
    assert "manage.py backfill_embeddings" in report["checks"]["coverage"]["message"]


def test_with_a_follower_running_a_segment_that_just_arrived_is_arriving_and_an_older_one_missing(complete, minilm):
    from django.utils import timezone

    from segments.models import BackfillWorker, PendingSince

    now = timezone.now()
    BackfillWorker.objects.create(worker_name="host:4242", started=now, updated=now, mode="follow (listen)",
                                  column="embedding")
    arrived = Segment.objects.create(video_id="v1", start_sec=50, end_sec=51, text="A segment that just arrived.")

    report, error = run(minilm)

    assert error is None, report["checks"]["coverage"]
    coverage = report["checks"]["coverage"]
    assert (coverage["missing"], coverage["arriving"]) == (0, 1)
    assert "the follower (host:4242) embeds them" in coverage["message"]

    PendingSince.objects.filter(segment_id=arrived.pk).update(since=now - timezone.timedelta(minutes=1))
    report, error = run(minilm)

    assert str(error) == "1 check(s) failed: coverage."
    assert (report["checks"]["coverage"]["missing"], report["checks"]["coverage"]["arriving"]) == (1, 0)


def test_a_segment_arriving_while_the_coverage_counts_is_neither_missing_nor_arriving(complete, minilm):
    from django.utils import timezone

    from segments.models import BackfillWorker

    now = timezone.now()
    BackfillWorker.objects.create(worker_name="host:4343", started=now, updated=now, mode="follow (listen)",
                                  column="embedding")
    Segment.objects.create(video_id="v1", start_sec=50, end_sec=51, text="A segment the follower embeds now.")
    arrivals = []

    def arrive_after_the_count(execute, sql, params, many, context):
        found = execute(sql, params, many, context)
        if "FILTER (WHERE" in sql and not arrivals:  # the coverage's count has been taken: a segment arrives
            arrivals.append(Segment.objects.create(video_id="v1", start_sec=60, end_sec=61, text="Just after it."))
        return found

    with connection.execute_wrapper(arrive_after_the_count):
        report, error = run(minilm)

    assert arrivals and error is None, report["checks"]["coverage"]
    assert (report["checks"]["coverage"]["missing"], report["checks"]["coverage"]["arriving"]) == (0, 1)


def test_a_quarantined_segment_fails_coverage(complete, minilm):
    Segment.objects.filter(pk=complete[3].pk).update(embedding=None)
    QuarantinedSegment.objects.create(segment_id=complete[3].pk, text_md5="0" * 32, reason="tokenizer failed")

    report, error = run(minilm)

    assert report["checks"]["coverage"]["quarantined"] == 1
    assert "--retry-quarantined" in report["checks"]["coverage"]["message"]


def test_a_vector_of_the_wrong_length_fails_unit_norms(complete, minilm):
    vector = np.array(Segment.objects.get(pk=complete[5].pk).embedding, dtype=np.float32)
    Segment.objects.filter(pk=complete[5].pk).update(embedding=vector * 2)

    report, error = run(minilm)

    assert str(error) == "1 check(s) failed: unit_norms."
    assert report["checks"]["unit_norms"]["off_norm"] == 1
    assert report["checks"]["unit_norms"]["max_norm"] == pytest.approx(2.0, abs=1e-4)


def test_a_vector_left_from_other_text_fails_stale(complete, minilm):
    other = Segment.objects.get(pk=complete[0].pk).embedding
    Segment.objects.filter(pk=complete[7].pk).update(embedding=other)

    report, error = run(minilm, sample=100)

    assert str(error) == "1 check(s) failed: stale."
    assert report["checks"]["stale"]["stale_ids"] == [complete[7].pk]


def test_an_invalid_index_fails_and_says_how_to_rebuild_it(complete, minilm):
    with connection.cursor() as cursor:  # the state an interrupted CREATE INDEX CONCURRENTLY leaves
        cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'segments_embedding_hnsw'::regclass")

    report, error = run(minilm)

    assert "index" in error.args[0]
    assert report["checks"]["index"]["valid"] is False
    assert "REINDEX INDEX CONCURRENTLY segments_embedding_hnsw" in report["checks"]["index"]["message"]
    assert report["checks"]["recall"]["ok"] is None  # not measured on an index queries ignore


def test_a_missing_index_fails(complete, minilm):
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX segments_embedding_hnsw")

    report, error = run(minilm)

    assert error is not None and report["checks"]["index"]["ok"] is False
    assert "CREATE INDEX CONCURRENTLY" in report["checks"]["index"]["message"]


def test_without_the_model_the_model_check_fails_naming_the_setting(complete, settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.EMBEDDING_MODEL = "no-such-org/no-such-model"

    report, error = run(None)

    assert report["checks"]["model"]["ok"] is False and "EMBEDDING_MODEL=" in report["checks"]["model"]["message"]
    assert report["checks"]["stale"]["ok"] is None  # nothing was embedded


def _write(cursor, column, segment_id, vector):
    cursor.execute(f"UPDATE segments SET {column} = %s::vector WHERE id = %s",
                   ["[" + ",".join(map(str, vector)) + "]", segment_id])


def _fill_two_columns(minilm, new_column="embedding_384", legacy_column="embedding"):
    """Segments with MiniLM vectors in `new_column` and random ones in `legacy_column`; their ids."""
    rng = np.random.default_rng(3)
    ids = []
    with connection.cursor() as cursor:
        for text, vector in zip(TEXTS, encode(minilm, TEXTS)):
            cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES ('v', 0, 1, %s) "
                           "RETURNING id", [text])
            ids.append(cursor.fetchone()[0])
            _write(cursor, new_column, ids[-1], vector)
            _write(cursor, legacy_column, ids[-1], rng.normal(size=1536) / np.sqrt(1536))
    return ids


@pytest.mark.parametrize("phase, new_column, legacy_column, index, reported_phase", [
    ("indexed", "embedding_384", "embedding", "segments_embedding_384_hnsw", "expanded"),
    ("swapped", "embedding", "embedding_legacy", "segments_embedding_hnsw", "swapped"),
])
def test_while_the_legacy_column_exists_it_checks_the_new_one_and_reports_the_overlap(
        segments_at, minilm, phase, new_column, legacy_column, index, reported_phase):
    segments_at(phase)
    _fill_two_columns(minilm, new_column, legacy_column)

    report, error = run(minilm, sample=20)

    assert error is None and report["column"] == new_column and report["phase"] == reported_phase
    assert report["checks"]["index"]["index"] == index
    overlap = report["checks"]["legacy_overlap"]
    assert overlap["ok"] is None and overlap["queries"] == 20 and 0.0 <= overlap["mean_overlap"] <= 1.0


def test_before_the_index_is_built_it_names_the_migration(segments_at, minilm):
    segments_at("expanded")
    _fill_two_columns(minilm)

    report, error = run(minilm)

    assert "index" in error.args[0]
    assert "manage.py embedding_switch index" in report["checks"]["index"]["message"]


def test_before_phase_one_it_names_the_migration(segments_at, minilm):
    segments_at("legacy")

    report, error = run(minilm)

    assert str(error) == "1 check(s) failed: phase."
    assert "manage.py migrate" in report["checks"]["phase"]["message"]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_golden_queries_give_hit_rate_and_mrr(complete, minilm, tmp_path, suffix):
    # The query "Segment 4 about ketones." is that segment's own text: it ranks first. No
    # segment has id 999999: that query misses. hit@10 = 1/2, MRR = (1/1 + 0) / 2.
    golden = tmp_path / f"golden{suffix}"
    rows = [(TEXTS[4], [complete[4].pk]), ("anything at all", [999999])]
    if suffix == ".json":
        golden.write_text(json.dumps([{"query": q, "expected": ids} for q, ids in rows]))
    else:
        golden.write_text("query,expected\n" + "".join(f'"{q}",{" ".join(map(str, ids))}\n' for q, ids in rows))

    report, error = run(minilm, "--golden", str(golden))

    assert error is None
    check = report["checks"]["golden"]
    assert (check["ok"], check["queries"], check["hit_at_10"], check["mrr"]) == (None, 2, 0.5, 0.5)
    assert check["misses"] == ["anything at all"]


def test_an_unreadable_golden_file_names_the_format(complete, minilm, tmp_path):
    golden = tmp_path / "golden.json"
    golden.write_text('[{"question": "no query key"}]')

    with pytest.raises(CommandError, match='JSON list of {"query": "...", "expected": \\[ids\\]}'):
        call_command("verify_embeddings", "--golden", str(golden), encoder=minilm)


@pytest.mark.slow
def test_the_command_exits_non_zero_with_the_json_on_stdout(transactional_db, minilm):
    segments = write_segments(minilm, TEXTS[:10])
    Segment.objects.filter(pk=segments[0].pk).update(embedding=None)

    process = manage("verify_embeddings", "--json", env={"EMBEDDING_MODEL": MINILM_PATH})
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 1
    assert json.loads(stdout)["checks"]["coverage"]["missing"] == 1
    assert "1 check(s) failed: coverage." in stderr


def test_verbosity_zero_prints_nothing_when_every_check_passes(complete, minilm):
    out = StringIO()
    call_command("verify_embeddings", "--sample", "5", verbosity=0, stdout=out, encoder=minilm)

    assert out.getvalue() == ""


# --- The recall check's time limits: every query waits on a lock another session holds ---------

@contextmanager
def table_locked():
    """Another session holds ACCESS EXCLUSIVE on segments: every search waits until its timeout."""
    other = psycopg2.connect(**connection.get_connection_params())
    try:
        with other.cursor() as cursor:
            cursor.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")  # in psycopg2's open transaction
        yield
    finally:
        other.rollback()
        other.close()


def sampled_rows(count):
    with connection.cursor() as cursor:
        return verify_module._sample(cursor, "embedding", None, count)


@pytest.mark.django_db(transaction=True)
def test_recall_queries_that_time_out_are_reported_not_dropped(minilm):
    write_segments(minilm, TEXTS[:10])
    rows = sampled_rows(3)

    with table_locked():
        check = verify_module._recall(rows, "embedding", 100, seconds=60, query_seconds=0.2, using="default")

    assert check.ok is False and check.figures["queries"] == 0
    assert check.figures["timed_out"] == 3 and sorted(check.figures["timed_out_ids"]) == sorted(r[0] for r in rows)
    assert check.message.startswith("No recall measured: 3 timed out after 0.2 s or less and are not counted "
                                    "(segment ids ")
    assert "--recall-query-seconds" in check.message


@pytest.mark.django_db(transaction=True)
def test_the_recall_budget_stops_the_sampling(minilm):
    write_segments(minilm, TEXTS)
    rows = sampled_rows(40)

    with table_locked():  # each query takes its whole timeout: 0.2 s, then what is left of 0.5 s
        check = verify_module._recall(rows, "embedding", 100, seconds=0.5, query_seconds=0.2, using="default")

    figures = check.figures
    assert figures["budget_spent"] is True and figures["sampled"] == 40
    assert 1 <= figures["timed_out"] < 40 and figures["queries"] == 0
    assert f"the 0.5 s budget was spent after {figures['timed_out']} of 40 sampled queries" in check.message


def test_the_recall_options_must_be_positive(complete, minilm):
    with pytest.raises(CommandError, match="--recall-seconds must be more than 0"):
        call_command("verify_embeddings", "--recall-seconds", "0", encoder=minilm)
    with pytest.raises(CommandError, match="--recall-query-seconds must be more than 0"):
        call_command("verify_embeddings", "--recall-query-seconds", "-1", encoder=minilm)
