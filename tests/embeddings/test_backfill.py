"""The backfill engine against the real PostgreSQL, with the zero-cost HashingEncoder."""
import threading
import time

import numpy as np
import pytest
from django.db import connection

from segments.switch.backfill import BEFORE_FIRST_ID, BackfillError, Tuning, claim_sql, connector, run_backfill
from embeddings.encoder import DimensionMismatch
from embeddings.fakes import HashingEncoder
from segments.models import BackfillClaim, QuarantinedSegment
from segments.switch import swap
from tests.conftest import as_stored, wait_until
from tests.embeddings.conftest import (
    add_segments, is_blank_in_postgres, scalar, segment_texts, sentences, stored_vectors, vector_column,
)
from tests.embeddings.encoders import POISON_NAN, POISON_RAISE, BrokenEncoder, PoisonedEncoder, RecordingEncoder

pytestmark = pytest.mark.django_db(transaction=True)

BLANKS = ["", " ", "\t\n\r  ", "\x0b\x0c"]


def assert_every_vector_is_its_texts(column=None, encoder=None):
    """Every segment with text has exactly the vector of its current text; blank ones have none."""
    encoder = encoder or HashingEncoder()
    column = column or vector_column()
    texts, vectors = segment_texts(), stored_vectors(column)
    for segment_id, text in texts.items():
        if is_blank_in_postgres(text):
            assert vectors[segment_id] is None, f"blank segment {segment_id} got a vector"
        else:
            assert vectors[segment_id] is not None, f"segment {segment_id} has no vector"
            expected = as_stored(encoder.encode_documents([text])[0], column)  # rounded as a halfvec holds it
            assert np.array_equal(vectors[segment_id], expected), segment_id


def test_every_segment_with_text_gets_its_vector_and_blank_ones_stay_null():
    add_segments(sentences(250) + BLANKS)
    progress = []
    report = run_backfill(HashingEncoder(), batch_size=40, progress=lambda done, total: progress.append((done, total)))
    assert (report.rows_embedded, report.rows_quarantined, report.rows_remaining) == (250, 0, 0)
    assert report.rows_blank == len(BLANKS) and report.batches == 7
    assert_every_vector_is_its_texts()
    assert BackfillClaim.objects.count() == 0
    assert progress[0] == (0, 250) and progress[-1] == (250, 250)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


def test_blank_segments_are_not_pending_so_the_swap_does_not_wait_for_them():
    add_segments(["some text"] + BLANKS)
    run_backfill(HashingEncoder())
    with connection.cursor() as cursor:
        assert swap.missing_vectors(cursor, "embedding") == (0, 0)
    assert sum(v is None for v in stored_vectors().values()) == len(BLANKS)


def test_a_second_run_finds_nothing_to_do():
    add_segments(sentences(30))
    run_backfill(HashingEncoder())
    encoder = RecordingEncoder()
    report = run_backfill(encoder)
    assert (report.rows_embedded, report.rows_remaining, encoder.encoded) == (0, 0, [])


def test_before_the_swap_the_new_column_is_filled_and_the_legacy_one_left_alone(segments_at):
    segments_at("expanded")
    ids = add_segments(sentences(20))
    with connection.cursor() as cursor:
        cursor.execute("UPDATE segments SET embedding = array_fill(0.5::real, ARRAY[1536])::vector WHERE id = %s",
                       [ids[0]])
    report = run_backfill(HashingEncoder(), batch_size=8)
    assert (report.column, report.rows_embedded) == ("embedding_384", 20)
    assert_every_vector_is_its_texts("embedding_384")
    legacy = stored_vectors("embedding")
    assert legacy[ids[0]].shape == (1536,) and all(legacy[i] is None for i in ids[1:])


@pytest.mark.parametrize("phase, index", [("expanded", "segments_embedding_384_todo"),
                                          ("final", "segments_embedding_todo")])
def test_the_claim_query_reads_the_partial_index_of_pending_rows(segments_at, phase, index):
    segments_at(phase)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) "
                       "SELECT 'v', n, n + 1, ' ' FROM generate_series(1, 20000) n")
    add_segments(sentences(50))
    column = "embedding_384" if phase == "expanded" else "embedding"
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE segments")
        cursor.execute("EXPLAIN " + claim_sql(column), {"after": BEFORE_FIRST_ID, "limit": 1000})
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert f"Index Scan using {index} on segments" in plan, plan


def test_limit_stops_after_that_many_rows():
    add_segments(sentences(50))
    report = run_backfill(HashingEncoder(), batch_size=8, limit=20)
    assert (report.rows_embedded, report.rows_remaining) == (20, 30)
    assert sum(v is not None for v in stored_vectors().values()) == 20


def test_a_text_edited_after_embedding_is_embedded_again():
    ids = add_segments(sentences(5))
    run_backfill(HashingEncoder())
    with connection.cursor() as cursor:
        cursor.execute("UPDATE segments SET text = 'an edited text' WHERE id = %s", [ids[2]])
    assert stored_vectors()[ids[2]] is None  # the staleness trigger cleared it
    report = run_backfill(HashingEncoder())
    assert report.rows_embedded == 1
    assert_every_vector_is_its_texts()


class EditingEncoder(RecordingEncoder):
    """Edits (or inserts) segments while it encodes the first batch, as a live application would."""

    def __init__(self, edit):
        super().__init__()
        self.edit = edit

    def encode_documents(self, texts, texts_per_call=None):
        vectors = super().encode_documents(texts)
        if self.edit is not None:
            self.edit()  # the test's connection, autocommit: visible to the engine at once
            self.edit = None
        return vectors


def test_a_text_edited_while_its_batch_is_encoded_is_not_written_with_the_old_vector():
    ids = add_segments(sentences(30))

    def edit():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE segments SET text = 'edited while in flight' WHERE id = %s", [ids[3]])

    encoder = EditingEncoder(edit)
    report = run_backfill(encoder, batch_size=10)
    assert report.rows_stale == 1 and report.rows_embedded == 30
    assert encoder.encoded.count("edited while in flight") == 1
    assert_every_vector_is_its_texts()


def test_segments_inserted_during_the_run_are_embedded_before_it_finishes():
    add_segments(sentences(30))

    def insert():
        add_segments(["inserted ahead of the cursor"])
        with connection.cursor() as cursor:  # an id behind every cursor, below zero even
            cursor.execute("INSERT INTO segments (id, video_id, start_sec, end_sec, text) "
                           "VALUES (-7, 'v', 0, 1, 'inserted behind the cursor')")

    report = run_backfill(EditingEncoder(insert), batch_size=10)
    assert (report.rows_embedded, report.rows_remaining) == (32, 0)
    assert_every_vector_is_its_texts()


def test_a_model_of_the_wrong_width_is_refused_before_any_row_is_read():
    add_segments(sentences(5))
    encoder = RecordingEncoder(dimensions=768)
    with pytest.raises(DimensionMismatch, match="768-dim vectors but segments.embedding holds 384"):
        run_backfill(encoder)
    assert encoder.calls == ["check_dimensions"]
    assert all(v is None for v in stored_vectors().values())
    assert BackfillClaim.objects.count() == 0 and QuarantinedSegment.objects.count() == 0


def test_a_nan_vector_is_quarantined_with_its_reason_and_the_rest_written():
    ids = add_segments(sentences(10) + [f"a text that gives {POISON_NAN}"] + sentences(10, seed=1))
    report = run_backfill(PoisonedEncoder(), batch_size=8)
    assert (report.rows_embedded, report.rows_quarantined) == (20, 1)
    assert (report.rows_remaining, report.rows_in_quarantine) == (1, 1)
    entry = QuarantinedSegment.objects.get()
    assert (entry.segment_id, entry.reason, entry.attempts) == (ids[10], "vector contains NaN or Inf", 1)
    assert stored_vectors()[ids[10]] is None


def test_a_quarantined_row_is_skipped_until_retried_and_retried_once_per_run():
    ids = add_segments([f"{POISON_NAN} text", "fine text"])
    run_backfill(PoisonedEncoder())
    skipping = PoisonedEncoder()
    assert run_backfill(skipping).rows_quarantined == 0 and skipping.encoded == []

    retrying = PoisonedEncoder()
    report = run_backfill(retrying, retry_quarantined=True)
    assert report.rows_quarantined == 1 and retrying.encoded.count(f"{POISON_NAN} text") == 1
    assert QuarantinedSegment.objects.get().attempts == 2

    report = run_backfill(HashingEncoder(), retry_quarantined=True)  # the cause was fixed
    assert (report.rows_embedded, report.rows_in_quarantine) == (1, 0)
    assert QuarantinedSegment.objects.count() == 0 and stored_vectors()[ids[0]] is not None


def test_a_text_whose_encoding_raises_is_quarantined_with_the_error():
    ids = add_segments(sentences(6) + [f"{POISON_RAISE} here"] + sentences(6, seed=2))
    report = run_backfill(PoisonedEncoder(), batch_size=13)
    assert (report.rows_embedded, report.rows_quarantined) == (12, 1)
    assert QuarantinedSegment.objects.get(segment_id=ids[6]).reason == "encoding failed: ValueError: tokenizer exploded"


def test_a_quarantine_entry_lapses_when_the_text_changes():
    ids = add_segments([f"{POISON_NAN} text"])
    run_backfill(PoisonedEncoder())
    with connection.cursor() as cursor:
        cursor.execute("UPDATE segments SET text = 'a better text' WHERE id = %s", [ids[0]])
    report = run_backfill(PoisonedEncoder())
    assert (report.rows_embedded, report.rows_in_quarantine) == (1, 0)
    assert QuarantinedSegment.objects.count() == 0


def test_an_encoder_that_fails_on_everything_stops_the_run_and_quarantines_nothing():
    add_segments(sentences(20))
    with pytest.raises(BackfillError, match="fails on every text") as error:
        run_backfill(BrokenEncoder(), batch_size=5)
    assert error.value.report.rows_remaining == 20
    assert QuarantinedSegment.objects.count() == 0 and BackfillClaim.objects.count() == 0


def test_a_dead_workers_claim_is_taken_over():
    ids = add_segments(sentences(10))
    BackfillClaim.objects.create(first_id=ids[0], last_id=ids[-1], worker_pid=2**30, worker_started_at="2020-01-01T00:00Z",
                                 worker_name="gone:1")
    assert run_backfill(HashingEncoder()).rows_embedded == 10
    assert BackfillClaim.objects.count() == 0


def test_rows_claimed_by_a_live_worker_are_waited_for_not_taken():
    ids = add_segments(sentences(10))
    with connection.cursor() as cursor:  # this test's session plays a live worker holding ids[:3]
        cursor.execute("SELECT pg_backend_pid(), backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        pid, started = cursor.fetchone()
    claim = BackfillClaim.objects.create(first_id=ids[0], last_id=ids[2], worker_pid=pid, worker_started_at=started,
                                         worker_name="live:1")
    encoder = RecordingEncoder()
    released = threading.Timer(1.5, claim.delete)  # the live worker finishes (without writing)
    started_at = time.monotonic()
    released.start()
    report = run_backfill(encoder)
    released.join()
    assert time.monotonic() - started_at >= 1.5
    assert report.rows_embedded == 10 and report.batches == 2
    assert_every_vector_is_its_texts()


class ArrivingEncoder(RecordingEncoder):
    """Calls `arrive()` in its second encode call, once the pass's first batch is written."""

    def __init__(self, arrive):
        super().__init__()
        self.arrive, self.calls_made = arrive, 0

    def encode_documents(self, texts, texts_per_call=None):
        self.calls_made += 1
        if self.calls_made == 2:
            assert wait_until(lambda: scalar(f"SELECT count({vector_column()}) FROM segments") > 0, 10)
            self.arrive()
        return super().encode_documents(texts)


def test_rows_that_arrive_during_the_run_and_another_worker_holds_are_left_to_it():
    add_segments(sentences(30))
    with connection.cursor() as cursor:  # this test's session plays a live follower
        cursor.execute("SELECT pg_backend_pid(), backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        pid, started = cursor.fetchone()
    held = []

    def arrive():  # the application inserts while the pass runs; the follower claims the arrivals at once
        ids = add_segments([f"arrival {n} during the run" for n in range(3)])
        held.append(BackfillClaim.objects.create(first_id=ids[0], last_id=ids[-1], worker_pid=pid,
                                                 worker_started_at=started, worker_name="follower:1"))

    let_go = threading.Timer(10, lambda: BackfillClaim.objects.filter(worker_name="follower:1").delete())
    let_go.start()  # were the pass to wait for the follower's claim, it would end only then
    try:
        started_at = time.monotonic()
        report = run_backfill(ArrivingEncoder(arrive), batch_size=10, tuning=Tuning(encode_window=1))
        took = time.monotonic() - started_at
    finally:
        let_go.cancel()
    assert took < 5, took
    assert (report.rows_embedded, report.rows_remaining) == (30, 3)
    assert list(BackfillClaim.objects.all()) == held  # the follower's claim is its own still


def test_a_connection_factory_points_the_engine_at_another_schema():
    add_segments(["public text"])
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE SCHEMA scratch;
            CREATE TABLE scratch.segments (LIKE public.segments INCLUDING ALL);
            CREATE TABLE scratch.embeddings_quarantine (LIKE public.embeddings_quarantine INCLUDING ALL);
            CREATE TABLE scratch.embeddings_backfill_claim (LIKE public.embeddings_backfill_claim INCLUDING ALL);
            INSERT INTO scratch.segments (id, video_id, start_sec, end_sec, text)
                SELECT n, 'v', n, n + 1, 'scratch text ' || n FROM generate_series(1, 25) n;
        """)
    try:
        report = run_backfill(HashingEncoder(), batch_size=10, connect=connector(search_path="scratch, public"))
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM scratch.segments WHERE embedding IS NOT NULL")
            assert report.rows_embedded == cursor.fetchone()[0] == 25
            cursor.execute("SHOW search_path")
            assert "scratch" not in cursor.fetchone()[0]  # the caller's connection is left as it was
        assert list(stored_vectors().values()) == [None]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP SCHEMA scratch CASCADE")


def test_the_claim_log_is_empty_after_a_run_and_no_session_is_left_open():
    add_segments(sentences(30))
    run_backfill(HashingEncoder(), batch_size=7)
    assert BackfillClaim.objects.count() == 0
    # a closed session's backend exits a moment after the client hangs up
    deadline = time.monotonic() + 5
    while engine_sessions() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine_sessions() == 0


def engine_sessions():
    return scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'backfill_embeddings%%' "
                  "AND datname = current_database()")
