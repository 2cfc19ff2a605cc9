"""Where the switch stands (segments.switch.status, `manage.py embedding_status`), on the real
database at each phase, with rows whose state is known, a real backfill and a real index build."""
import hashlib
import json
import threading
import time
import uuid
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection, connections
from django.db.migrations.recorder import MigrationRecorder

from embeddings.fakes import HashingEncoder
from segments.models import BackfillWorker, QuarantinedSegment, SwitchEvent
from segments.storage import configured
from segments.switch import preflight, status, swap
from segments.switch.backfill import run_backfill
from segments.switch.backfill.session import open_connection, worker_name
from tests.embeddings.conftest import add_segments, command, scalar, sentences
from tests.embeddings.encoders import RecordingEncoder

pytestmark = pytest.mark.django_db(transaction=True)

KNOWN_ROWS = {"total": 6, "with_text": 5, "embedded": 3, "pending": 2, "quarantined": 1, "blank": 1}


def fill(column, ids, dims=384):
    """Give segments `ids` a (meaningless) `dims`-dim vector in `column`."""
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE segments SET {column} = array_fill(0.5::real, ARRAY[{dims}])::vector "
                       "WHERE id = ANY(%s)", [list(ids)])


def quarantine(segment_id, text):
    QuarantinedSegment.objects.create(segment_id=segment_id, reason="tokenizer failed",
                                      text_md5=uuid.UUID(hashlib.md5(text.encode()).hexdigest()))


def known_rows(column):
    """Three embedded segments, one pending, one quarantined, one blank; their ids."""
    ids = add_segments(["one", "two", "three", "four", "five", "  \t "])
    fill(column, ids[:3])
    quarantine(ids[4], "five")
    return ids


def steps(found):
    return {step["step"]: step["state"] for step in found["steps"]}


def wait_for(condition, seconds=30):
    """Call `condition()` until it returns something true; that value."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- Counts at each phase ----------------------------------------------------------------------

def test_in_the_expanded_phase_the_counts_of_known_rows(segments_at):
    segments_at("expanded")
    known_rows("embedding_384")

    found = status.collect()

    assert found["phase"] == "expanded"
    assert found["columns"] == {"vector": {"name": "embedding_384", "dimensions": 384, "type": configured().type_name},
                                "legacy": {"name": "embedding", "dimensions": 1536, "type": "vector"}}
    assert found["rows"] == KNOWN_ROWS
    assert found["undo_lacks"] is None and found["legacy_writes"] == 0
    assert steps(found) == {"expand": "done", "backfill": "current", "index": "todo", "swap": "todo",
                            "contract": "todo"}
    assert found["next"]["command"] == "python manage.py backfill_embeddings"
    assert found["next"]["why"].startswith("1 segment(s) with text have no 384-dim vector")


def test_in_the_swapped_phase_the_counts_and_what_an_undo_would_lack(segments_at):
    segments_at("swapped")
    ids = known_rows("embedding")
    fill("embedding_legacy", ids[:2], dims=1536)

    found = status.collect()

    assert found["phase"] == "swapped"
    assert found["columns"] == {"vector": {"name": "embedding", "dimensions": 384, "type": configured().type_name},
                                "legacy": {"name": "embedding_legacy", "dimensions": 1536, "type": "vector"}}
    assert found["rows"] == KNOWN_ROWS
    assert found["undo_lacks"] == 3  # five segments with text, two legacy vectors; the blank one needs none
    assert any(w.startswith("3 segment(s) with text have no legacy vector") for w in found["warnings"])
    assert found["swap"]["done"] is True
    assert steps(found) == {"expand": "done", "backfill": "done", "index": "done", "swap": "done",
                            "contract": "current"}


def test_before_the_swap_new_rows_carrying_a_legacy_vector_are_reported(segments_at):
    segments_at("expanded")
    began = SwitchEvent.objects.get(step="before").at
    with connection.cursor() as cursor:
        legacy_vector = "array_fill(0.1::real, ARRAY[1536])::vector"
        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text, embedding, created_at) VALUES "
                       f"('v', 0, 1, 'imported before the switch', {legacy_vector}, "
                       "(%s AT TIME ZONE 'UTC') - interval '1 day'), "
                       f"('v', 1, 2, 'written by the old application', {legacy_vector}, DEFAULT), "
                       "('v', 2, 3, 'written by the new application', NULL, DEFAULT)", [began])

    found = status.collect()

    assert found["legacy_writes"] == 1
    assert any("expected 384 dimensions, not 1536" in warning for warning in found["warnings"])


def test_the_table_size_now_and_before_the_switch(segments_at):
    segments_at("expanded")
    add_segments(sentences(50))

    size = status.collect()["size"]

    assert size["now_bytes"] == scalar("SELECT pg_total_relation_size('segments')")
    assert size["before_bytes"] == SwitchEvent.objects.get(step="before").details["total_bytes"]
    assert size["after_contract_bytes"] is None


def test_the_size_before_the_switch_is_the_filled_tables_when_phase_1_begins(segments_at):
    segments_at("legacy")
    # The load records its simulated vectors in the model ledger, whose migrations (and 0002, with
    # its first size record) it applies first: on a table still empty.
    call_command("load_demo_segments", count=300, stdout=StringIO())
    loaded = scalar("SELECT pg_total_relation_size('segments')")
    call_command("migrate", verbosity=0)  # phase 1

    before, = SwitchEvent.objects.filter(step="before")
    assert before.details["total_bytes"] >= loaded > 2 * 2**20  # the 300 legacy vectors and their index
    assert status.collect()["size"]["before_bytes"] == before.details["total_bytes"]


def test_in_the_final_phase_new_rows_call_for_the_backfill_and_then_nothing(db):
    assert status.collect()["next"]["command"] is None

    add_segments(["a segment imported after the switch"])
    found = status.collect()

    assert found["rows"]["pending"] == 1 and found["next"]["command"] == "python manage.py backfill_embeddings"
    assert found["size"]["after_contract_bytes"] == found["size"]["now_bytes"]  # no contract figure recorded


# --- Swap readiness and the next command -------------------------------------------------------

def test_once_indexed_the_swap_would_be_accepted_until_a_segment_is_quarantined(segments_at):
    segments_at("indexed")
    ids = add_segments(["one", "two"])
    fill("embedding_384", ids)

    ready = status.collect()

    assert ready["indexes"]["hnsw"] == {"name": "segments_embedding_384_hnsw", "valid": True}
    assert ready["swap"] == {"done": False, "accepted": True, "refusal": None}
    assert steps(ready)["swap"] == "current"
    assert ready["next"]["command"] == "python manage.py verify_embeddings"
    assert "python manage.py embedding_switch swap" in ready["next"]["why"]

    quarantine(add_segments(["three"])[0], "three")
    held = status.collect()

    assert held["swap"] == {"done": False, "accepted": False, "refusal": swap.refusal()}
    assert "quarantined" in held["swap"]["refusal"]
    assert held["next"]["command"] == "python manage.py backfill_embeddings --retry-quarantined"


def test_in_the_legacy_phase_the_next_command_adopts_or_migrates(segments_at):
    segments_at("legacy")
    assert status.collect()["next"]["command"] == "python manage.py migrate"

    MigrationRecorder(connection).record_unapplied("segments", "0001_initial")  # a table made elsewhere
    found = status.collect()

    assert found["phase"] == "legacy" and found["columns"]["vector"] is None
    assert found["next"]["command"] == "python manage.py migrate --fake-initial"
    lines = status.brief()
    assert 2 <= len(lines) <= 4
    assert lines[0] == "phase: legacy" and lines[1].startswith("next: python manage.py migrate --fake-initial")


def briefs(monkeypatch):
    """(status.brief()'s lines and the statements it sent, the lines the whole status gives)."""
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as sent:
        lines = status.brief()
    with monkeypatch.context() as whole:
        whole.setattr(status, "_next_after_the_swap", lambda using, *read: None)
        return lines, len(sent.captured_queries), status.brief()


def test_after_the_swap_the_brief_reads_two_statements_and_says_what_the_whole_status_says(segments_at,
                                                                                            monkeypatch):
    from django.utils import timezone

    from segments.switch import steps
    from tests.db.vectors import record_hand_made

    segments_at("swapped")
    known_rows("embedding")  # one segment pending, one quarantined
    lines, sent, whole = briefs(monkeypatch)
    assert lines == whole and sent == 2
    assert lines[:2] == ["phase: swapped", "next: python manage.py backfill_embeddings (1 segment(s) with text have "
                                           "no 384-dim vector yet)"]

    now = timezone.now()
    BackfillWorker.objects.create(worker_name="host:3", started=now - timezone.timedelta(seconds=10), updated=now,
                                  mode="batch", column="embedding", rows_done=100)
    lines, sent, whole = briefs(monkeypatch)
    assert lines == whole and sent == 2 and "once the running backfill finishes (ETA" in lines[1]

    steps.pause(reason="the replica is rebuilt")
    lines, sent, whole = briefs(monkeypatch)
    assert lines == whole and sent == 2
    assert lines[1].startswith("next: python manage.py embedding_switch resume") and "the replica is rebuilt" in lines[1]

    MigrationRecorder(connection).record_unapplied("sessions", "0001_initial")  # code deployed ahead of its migrate
    try:
        lines, sent, whole = briefs(monkeypatch)
    finally:
        MigrationRecorder(connection).record_applied("sessions", "0001_initial")
    assert lines == whole and sent == 2 and lines[1].startswith("next: python manage.py migrate (applies sessions.0001")

    segments_at("final")
    record_hand_made()  # another model than EMBEDDING_MODEL: the next switch
    lines, sent, whole = briefs(monkeypatch)
    assert lines == whole and sent == 2
    assert lines[:2] == ["phase: final", "next: python manage.py makeswitch (EMBEDDING_MODEL is "
                         f"{settings.EMBEDDING_MODEL}, and segments.embedding holds hand-made vectors: write the next "
                         "switch (README \"Switching again\"))"]


def test_only_a_follower_of_the_new_models_column_holds_the_next_step_back(segments_at):
    from django.utils import timezone

    segments_at("expanded")
    known_rows("embedding_384")  # one open pending row
    now = timezone.now()
    elsewhere = BackfillWorker.objects.create(worker_name="host:1", started=now, updated=now, mode="follow (listen)",
                                              column="embedding", rows_done=600)

    found = status.collect()
    assert found["backfill"]["running"] is False and found["backfill"]["rows_per_s"] is None
    assert "once the running backfill finishes" not in found["next"]["why"]

    elsewhere.delete()
    BackfillWorker.objects.create(worker_name="host:2", started=now, updated=now, mode="follow (listen)",
                                  column="embedding_384")
    assert status.collect()["backfill"]["running"] is True


def test_code_deployed_before_its_migrate_is_told_to_migrate_and_writes_nothing(segments_at, use_minilm):
    from django.core.management.base import CommandError

    from segments.switch.gate import migrate_to

    segments_at("0005_unmapped_legacy_columns")
    migrate_to("0002_bookkeeping_moved_to_segments", app="embeddings")  # no model ledger yet
    ids = add_segments(["one", "two"])

    found = status.collect()
    assert {"segments.0009_embedding_on_arrival", "embeddings.0003_vector_column"} <= set(found["migrations_waiting"])
    assert found["next"]["command"] == "python manage.py migrate"
    assert any("has not applied" in warning for warning in found["warnings"])
    for args in (["backfill_embeddings"], ["search_segments", "one"]):
        with pytest.raises(CommandError, match=r"model ledger .* does not exist.*run `python manage\.py migrate`"):
            command(*args)
    assert scalar("SELECT count(*) FROM segments WHERE id = ANY(%s) AND embedding_384 IS NOT NULL", [ids]) == 0

    call_command("migrate", verbosity=0)
    assert status.collect()["migrations_waiting"] == []


# --- Backfill workers --------------------------------------------------------------------------

def test_a_backfill_run_leaves_a_heartbeat_counting_the_rows_it_wrote():
    add_segments(sentences(45) + ["   "])

    run_backfill(HashingEncoder(), batch_size=20)

    worker = BackfillWorker.objects.get()
    assert (worker.worker_name, worker.rows_done) == (worker_name(), 45)
    assert worker.started <= worker.updated <= worker.finished
    assert status.collect()["backfill"] == {"running": False, "workers": [], "rows_per_s": None, "eta_seconds": None}


def test_a_running_backfill_shows_its_worker_device_rate_and_eta():
    add_segments(sentences(400))  # a few seconds of encoder calls: the status sees it running
    encoder = RecordingEncoder(delay=0.3)
    encoder.device = "cpu"

    def backfill():
        try:
            run_backfill(encoder, batch_size=10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=backfill)
    thread.start()
    try:
        found = wait_for(lambda: (lambda s: s if any(w["rows_done"] >= 20 for w in s["backfill"]["workers"]) else None)(
            status.collect()))
    finally:
        thread.join()

    backfill = found["backfill"]
    [worker] = backfill["workers"]
    assert backfill["running"] and (worker["name"], worker["device"]) == (worker_name(), "cpu")
    assert worker["rows_per_s"] > 0 and backfill["rows_per_s"] == worker["rows_per_s"]
    assert backfill["eta_seconds"] == round(found["rows"]["pending"] / backfill["rows_per_s"])
    assert found["next"]["why"].startswith("once the running backfill finishes")
    assert status.collect()["backfill"]["running"] is False


# --- Index build and validity ------------------------------------------------------------------

def test_an_index_build_in_progress_is_shown_and_the_invalid_index_it_leaves_reported(segments_at):
    segments_at("expanded")
    ids = add_segments(["one", "two"])
    fill("embedding_384", ids)
    writer = open_connection("default", "test-writer")  # a transaction writing the table: the build waits
    builder = open_connection("default", "test-builder")
    builder.autocommit = True
    errors = []

    def build():
        try:
            with builder.cursor() as cursor:
                cursor.execute("CREATE INDEX CONCURRENTLY status_test_hnsw ON segments "
                               f"USING hnsw (embedding_384 {configured().cosine_opclass})")
        except Exception as exc:  # the cancel below
            errors.append(exc)

    thread = threading.Thread(target=build)
    try:
        with writer.cursor() as cursor:
            cursor.execute("UPDATE segments SET video_id = video_id WHERE id = %s", [ids[0]])
        thread.start()
        # (the progress view is live; the catalogue is read in the status's snapshot, a moment older)
        building = wait_for(lambda: (lambda s: s if s["index_build"] and s["indexes"]["hnsw"] else None)(
            status.collect()))

        assert building["index_build"]["phase"] == "waiting for writers before build"
        assert building["index_build"]["index"] == "status_test_hnsw"
        assert building["indexes"]["hnsw"] == {"name": "status_test_hnsw", "valid": False}
        assert not any("INVALID" in warning for warning in building["warnings"])
        assert building["next"]["command"] == "python manage.py verify_embeddings"

        scalar("SELECT pg_cancel_backend(%s)", [building["index_build"]["pid"]])
        thread.join()
    finally:
        writer.rollback()
        writer.close()
        thread.join()
        builder.close()
    left = status.collect()

    assert errors and left["index_build"] is None
    assert left["indexes"]["hnsw"] == {"name": "status_test_hnsw", "valid": False}
    assert any("status_test_hnsw is INVALID" in warning for warning in left["warnings"])
    assert left["next"]["command"] == "python manage.py embedding_switch index"
    assert left["indexes"]["legacy"] == {"name": "segments_embedding_idx", "method": "ivfflat",
                                         "opclass": "vector_l2_ops", "valid": True}


# --- The command -------------------------------------------------------------------------------

def test_embedding_status_json_prints_the_whole_status(segments_at):
    segments_at("expanded")
    known_rows("embedding_384")

    found = json.loads(command("embedding_status", "--json")[0])

    assert set(found) == {"phase", "columns", "rows", "backfill", "index_build", "indexes", "index_plan", "swap",
                          "size", "undo_lacks", "legacy_writes", "preflight", "adopted", "migrations_waiting", "steps", "warnings", "next",
                          "models", "pending_age", "pause", "evaluation"}
    assert found["phase"] == "expanded" and found["rows"] == KNOWN_ROWS
    assert found["swap"] == {"done": False, "accepted": False, "refusal": swap.refusal()}
    assert found["indexes"]["hnsw"] is None and found["index_build"] is None
    assert found["index_plan"]["estimate"]["rows"] == KNOWN_ROWS["with_text"] and found["index_plan"]["fits"] is True
    assert found["size"]["before_bytes"] == SwitchEvent.objects.get(step="before").details["total_bytes"]
    report = preflight.inspect()
    assert [f["code"] for f in found["preflight"]["findings"]] == [f.code for f in report.findings]
    assert found["preflight"]["blocking"] == len(report.blocking)
    assert found["next"] == status.collect()["next"]


def test_embedding_status_text_shows_progress_counts_and_the_next_command(segments_at):
    segments_at("expanded")
    known_rows("embedding_384")

    out, _ = command("embedding_status", "--no-color")

    assert out.splitlines()[0] == "Embedding switch: phase expanded"
    assert "60.0%  3 of 5 with text" in out
    assert "total 6 · with text 5 · embedded 3 · pending 2 · quarantined 1 · blank 1" in out
    assert "Swap: would be refused: " + swap.refusal() in out
    assert "Next: python manage.py backfill_embeddings" in out
