"""The engine's Tuning against the real PostgreSQL: several write sessions, several claims per
encode call, asynchronous commits; the stages' times."""
import json

import pytest
from django.core.management.base import CommandError
from django.db import connection

from segments.switch.backfill import UNTUNED, Tuning, run_backfill
from tests.embeddings.conftest import add_segments, command, scalar, sentences
from tests.embeddings.encoders import POISON_NAN, PoisonedEncoder, RecordingEncoder
from tests.embeddings.test_backfill import assert_every_vector_is_its_texts

pytestmark = pytest.mark.django_db(transaction=True)


class CallSizes(RecordingEncoder):
    """Records how many texts each encode call got."""

    def __init__(self, delay=0.0):
        super().__init__(delay=delay)
        self.sizes = []

    def encode_documents(self, texts, texts_per_call=None):
        self.sizes.append(len(texts))
        return super().encode_documents(texts)


def test_three_write_sessions_write_every_row_once(write_log):
    with connection.cursor() as cursor:  # fires in the writers' sessions too (they quiet ENABLE'd triggers)
        cursor.execute("ALTER TABLE segments ENABLE ALWAYS TRIGGER test_log_write")
    ids = add_segments(sentences(400, seed=11))
    report = run_backfill(RecordingEncoder(), batch_size=25, tuning=Tuning(writers=3))
    assert (report.rows_embedded, report.rows_remaining, report.batches) == (400, 0, 16)
    with connection.cursor() as cursor:
        cursor.execute("SELECT segment_id, count(*), count(DISTINCT pid) FROM test_write_log GROUP BY segment_id")
        writes = {segment_id: count for segment_id, count, _ in cursor.fetchall()}
        cursor.execute("SELECT count(DISTINCT pid) FROM test_write_log")
        sessions = cursor.fetchone()[0]
    assert writes == {segment_id: 1 for segment_id in ids}
    assert sessions > 1  # the batches were shared between the write sessions
    assert report.stages["write"]["threads"] == 3
    assert_every_vector_is_its_texts()


def test_messages_sent_ahead_write_every_row_once_and_a_batch_with_failures_goes_in_a_message_of_its_own(write_log):
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE segments ENABLE ALWAYS TRIGGER test_log_write")
    texts = sentences(300, seed=17)
    texts[40], texts[215] = f"{POISON_NAN} one", f"{POISON_NAN} two"
    ids = add_segments(texts)
    report = run_backfill(PoisonedEncoder(), batch_size=20, tuning=Tuning(writers=3, write_ahead=True))
    assert (report.rows_embedded, report.rows_quarantined, report.batches) == (298, 2, 15)
    with connection.cursor() as cursor:
        cursor.execute("SELECT segment_id, count(*) FROM test_write_log GROUP BY segment_id")
        writes = dict(cursor.fetchall())
    assert writes == {segment_id: 1 for segment_id in ids if segment_id not in (ids[40], ids[215])}
    assert scalar("SELECT count(*) FROM embeddings_backfill_claim") == 0
    assert sorted(scalar_rows("SELECT segment_id FROM embeddings_quarantine")) == [(ids[40],), (ids[215],)]
    with connection.cursor() as cursor:  # the others hold their texts' vectors
        cursor.execute("DELETE FROM segments WHERE id = ANY(%s)", [[ids[40], ids[215]]])
    assert_every_vector_is_its_texts()


def test_the_former_settings_give_the_same_table():
    add_segments(sentences(90, seed=12))
    report = run_backfill(RecordingEncoder(), batch_size=20, tuning=UNTUNED)
    assert (report.rows_embedded, report.rows_remaining) == (90, 0)
    assert report.stages["write"]["threads"] == 1
    assert_every_vector_is_its_texts()


def test_claims_waiting_for_a_slow_encoder_are_encoded_together_and_written_apart():
    add_segments(sentences(200, seed=13))
    encoder = CallSizes(delay=0.3)
    report = run_backfill(encoder, batch_size=10, tuning=Tuning(encode_window=4))
    assert sum(encoder.sizes) == 200 and max(encoder.sizes) == 40  # four claims of ten in one call
    assert report.batches == 20  # each claim still its own transaction
    assert report.limited_by == "encode"
    assert report.stages["encode"]["busy_share"] > report.stages["write"]["busy_share"]
    assert_every_vector_is_its_texts()


def test_once_a_claim_comes_back_short_the_last_claims_are_encoded_one_at_a_time():
    add_segments(sentences(205, seed=14))
    encoder = CallSizes(delay=0.3)
    report = run_backfill(encoder, batch_size=10, tuning=Tuning(encode_window=4))
    assert sum(encoder.sizes) == 205 and max(encoder.sizes) == 40  # four claims in a call while more may come
    assert encoder.sizes[-1] == 5 and all(size <= 10 for size in encoder.sizes[-3:])  # then one a call
    assert report.rows_embedded == 205
    assert_every_vector_is_its_texts()


@pytest.fixture
def commit_log(transactional_db):
    """A table recording synchronous_commit in the transaction of every vector written."""
    with connection.cursor() as cursor:
        cursor.execute("""
            CREATE TABLE test_commit_log (setting text);
            CREATE FUNCTION test_log_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO test_commit_log VALUES (current_setting('synchronous_commit')); RETURN NEW; END $$;
            CREATE TRIGGER test_log_commit AFTER UPDATE OF embedding ON segments
                FOR EACH ROW EXECUTE FUNCTION test_log_commit();
            ALTER TABLE segments ENABLE ALWAYS TRIGGER test_log_commit;
        """)
    yield lambda: [row[0] for row in scalar_rows("SELECT DISTINCT setting FROM test_commit_log")]
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER test_log_commit ON segments; DROP FUNCTION test_log_commit(); "
                       "DROP TABLE test_commit_log;")


def scalar_rows(sql):
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def test_batches_commit_without_waiting_for_the_wal_flush_and_the_former_settings_wait(commit_log):
    add_segments(sentences(30, seed=14))
    run_backfill(RecordingEncoder(), batch_size=10)
    assert commit_log() == ["off"]
    assert scalar("SHOW synchronous_commit") == "on"  # the caller's session is left alone
    add_segments(sentences(30, seed=15), video_id="more")
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE test_commit_log")
    run_backfill(RecordingEncoder(), batch_size=10, tuning=UNTUNED)
    assert commit_log() == ["on"]


def test_writers_and_window_must_be_at_least_one():
    for bad in ({"writers": 0}, {"encode_window": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            Tuning(**bad)


def test_the_command_takes_the_number_of_write_sessions_and_reports_the_stages():
    add_segments(sentences(50, seed=16))
    out, _ = command("backfill_embeddings", "--writers", "3", "--batch-size", "10", "--json",
                     encoder=RecordingEncoder())
    report = json.loads(out)
    assert report["rows_embedded"] == 50 and report["stages"]["write"]["threads"] == 3
    assert report["limited_by"] in {"claim", "encode", "write"}
    with pytest.raises(CommandError, match="--writers must be at least 1"):
        command("backfill_embeddings", "--writers", "0", encoder=RecordingEncoder())
