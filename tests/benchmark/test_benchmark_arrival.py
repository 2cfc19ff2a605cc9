"""`embedding_benchmark --suite arrival`: the follower (a child process) and the reference (plain
backfill runs back to back) under the same stream of arrivals, on scratch copies only; latencies on
the server's clock, the follower's memory and its exit on SIGTERM."""
import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from benchmark import arrival, report
from benchmark.encoders import BenchmarkModelUnavailable
from benchmark.runner import DEFAULT_SUITES, Context, Options
from benchmark.scratch import scratch_schema, scratch_schemas
from benchmark.source import vector_column
from embeddings.ledger import LEDGER
from tests.benchmark.test_benchmark import LIVE_TEXTS, add_live_segments, live_state
from tests.conftest import MINILM_PATH

TINY = ["--rows", "60", "--arrival-rate", "5", "--arrival-seconds", "4", "--arrival-grace", "30"]


def live_ledger():
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM public.{LEDGER} ORDER BY id")
        return cursor.fetchall()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_tiny_run_measures_both_sides_and_leaves_the_live_tables_as_they_were():
    add_live_segments(LIVE_TEXTS)
    before, ledger_before = live_state(), live_ledger()
    out = StringIO()

    call_command("embedding_benchmark", "--suite", "arrival", *TINY, "--json", stdout=out, stderr=StringIO(),
                 arrival_encoder="hashing")

    results = json.loads(out.getvalue())
    figures = results["arrival"]
    assert set(results) == {"machine", "arrival", "run"}
    assert (figures["arrivals"], figures["inserts"], figures["edits"]) == (20, 10, 10)
    assert figures["model"].startswith("HashingEncoder")
    follower, reference = figures["follower"], figures["reference"]
    for side in (follower, reference):
        assert (side["arrivals"], side["with_vector"], side["missing"], side["superseded"]) == (20, 20, 0, 0)
        latency = side["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert side["by_kind"]["insert"]["arrivals"] == side["by_kind"]["edit"]["arrivals"] == 10
        assert side["writer"]["rate"] == pytest.approx(5, rel=0.2)
    assert follower["mode"] == "listen" and follower["passes"] >= 1
    assert reference["runs"] >= 1 and reference["segments_per_run"] > 0
    assert figures["follower_p95_ms"] == follower["latency_ms"]["p95"]
    assert figures["reference_p50_ms"] == reference["latency_ms"]["p50"]
    rss = follower["rss"]
    assert len(rss["samples"]) >= 5 and 0 < rss["start_mb"] <= rss["max_mb"]
    assert rss["samples"][0][0] < 0 < rss["samples"][-1][0]  # from the follower's start, past the stream's
    stop = follower["stop"]
    assert stop["exit_code"] == 0 and stop["seconds"] <= arrival.STOP_WITHIN_SECONDS and stop["clean"]
    assert figures["targets"]["follower_exits_0_within_5_s_of_sigterm"] is True

    text = "\n".join(report.render(results))
    assert "arrival: commit-to-vector latency" in text and "follower (listen)" in text
    assert "reference (backfill runs back to back)" in text and "SIGTERM -> exit status 0" in text
    assert scratch_schemas() == []
    assert live_state() == before and live_ledger() == ledger_before


@pytest.mark.django_db(transaction=True)
def test_latency_is_matched_by_segment_and_text_and_an_arrival_edited_again_is_superseded():
    with scratch_schema() as scratch:
        ctx = Context(Options(rows=20), scratch, None, "cpu", vector_column(), progress=lambda message: None)
        _, ids = arrival.prepare(ctx)
        logs, vectors = scratch.table(arrival.ARRIVAL_LOG), scratch.table(arrival.VECTOR_LOG)
        with connection.cursor() as cursor:
            cursor.execute(f"""
                INSERT INTO {logs} VALUES
                    (0, 'insert', 900, md5('a')::uuid, '2030-01-01 00:00:00+00'),
                    (1, 'edit', %(edited)s, md5('b')::uuid, '2030-01-01 00:00:01+00'),
                    (2, 'edit', %(edited)s, md5('c')::uuid, '2030-01-01 00:00:02+00'),
                    (3, 'insert', 901, md5('d')::uuid, '2030-01-01 00:00:03+00');
                INSERT INTO {vectors} VALUES
                    (900, md5('a')::uuid, '2030-01-01 00:00:00.25+00'),
                    (900, md5('a')::uuid, '2030-01-01 00:00:09+00'),
                    (%(edited)s, md5('c')::uuid, '2030-01-01 00:00:02.5+00'),
                    (901, md5('other text')::uuid, '2030-01-01 00:00:04+00');
            """, {"edited": ids[0]})
            assert arrival.waiting(cursor, scratch) == 1  # 3: its vector is another text's
        figures = arrival.latency_figures(ctx)
    assert (figures["arrivals"], figures["with_vector"], figures["missing"], figures["superseded"]) == (4, 2, 1, 1)
    assert figures["latency_ms"]["p50"] == pytest.approx(375) and figures["latency_ms"]["max"] == pytest.approx(500)
    assert figures["by_kind"]["insert"]["max"] == pytest.approx(250)


@pytest.mark.django_db(transaction=True)
def test_the_scratch_copy_logs_a_vector_at_the_commit_of_its_write_and_the_staleness_trigger_still_works():
    with scratch_schema() as scratch:
        ctx = Context(Options(rows=20), scratch, None, "cpu", vector_column(), progress=lambda message: None)
        table, ids = arrival.prepare(ctx)
        column = ctx.column.name
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*), count({column}) FROM {table} WHERE text !~ '^[[:space:]]*$'")
            with_text, with_vector = cursor.fetchone()
            cursor.execute(f"UPDATE {table} SET text = 'an edited text' WHERE id = %s", [ids[0]])
            cursor.execute(f"SELECT {column} IS NULL FROM {table} WHERE id = %s", [ids[0]])
            cleared = cursor.fetchone()[0]
            cursor.execute(f"SELECT count(*) FROM {scratch.table(arrival.PENDING_SINCE)} WHERE segment_id = %s",
                           [ids[0]])
            stamped = cursor.fetchone()[0]
            cursor.execute(f"SET session_replication_role = replica; UPDATE {table} SET {column} = "
                           f"array_fill(0.05::real, ARRAY[{ctx.column.dimensions}]) WHERE id = %s; "
                           "SET session_replication_role = DEFAULT", [ids[0]])
            cursor.execute(f"SELECT segment_id, text_md5 = md5('an edited text')::uuid FROM "
                           f"{scratch.table(arrival.VECTOR_LOG)}")
            logged = cursor.fetchall()
    assert with_vector == with_text == len(ids) > 0  # the copied segments have their placeholders
    assert cleared and stamped == 1
    assert logged == [(ids[0], True)]  # ENABLE ALWAYS: logged under replica mode too
    assert scratch_schemas() == []


def test_the_stream_alternates_inserts_and_edits_of_distinct_segments_with_new_texts():
    arrivals = arrival.plan(9, [11, 12, 13, 14, 15], seed=3)
    assert [a.kind for a in arrivals] == ["insert", "edit"] * 4 + ["insert"]
    edited = [a.segment_id for a in arrivals if a.kind == "edit"]
    assert len(set(edited)) == 4 and set(edited) <= {11, 12, 13, 14, 15}
    assert all(a.segment_id is None for a in arrivals if a.kind == "insert")
    assert len({a.text for a in arrivals}) == 9
    assert [a.kind for a in arrival.plan(3, [])] == ["insert"] * 3  # nothing to edit


def test_the_suite_uses_the_configured_model_when_it_loads(settings):
    settings.EMBEDDING_MODEL = MINILM_PATH
    model = arrival.choose_model(Options())
    assert (model.encoder, model.name, model.chosen) == ("model", MINILM_PATH, "EMBEDDING_MODEL")


def test_without_the_configured_model_the_suite_says_it_uses_the_packaged_minilm(settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.EMBEDDING_MODEL = "BAAI/bge-small-en-v1.5-not-downloaded"
    model = arrival.choose_model(Options())
    assert model.name == MINILM_PATH
    assert "EMBEDDING_MODEL='BAAI/bge-small-en-v1.5-not-downloaded' cannot be loaded here" in model.chosen


def test_a_named_model_that_cannot_be_loaded_is_an_error_never_replaced(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BenchmarkModelUnavailable, match="--arrival-model 'BAAI/not-here'"):
        arrival.choose_model(Options(arrival_model="BAAI/not-here"))


def test_the_arrival_suite_runs_only_when_asked_for():
    assert "arrival" not in DEFAULT_SUITES and "arrival" not in Options().suites


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("args, message", [
    (["--arrival-rate", "0"], "--arrival-rate must be more than 0"),
    (["--arrival-seconds", "-1"], "--arrival-seconds must be more than 0"),
    (["--arrival-grace", "-1"], "--arrival-grace must be at least 0"),
    (["--arrival-model", "/nonexistent/model"], "--arrival-model '/nonexistent/model' cannot be loaded here"),
])
def test_bad_arrival_options_are_refused_before_any_work(args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CommandError, match=message):
        call_command("embedding_benchmark", "--suite", "arrival", *args, stdout=StringIO(), stderr=StringIO())
    assert scratch_schemas() == []
