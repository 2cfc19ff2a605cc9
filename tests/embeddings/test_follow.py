"""`backfill_embeddings --follow`: every segment searchable soon after its commit, at every phase.

In-process followers (a thread, the zero-cost HashingEncoder) check what it writes and when; the
process tests run the real command (tests/embeddings/fake_backfill.py) and send it signals.
"""
import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from askdrchaffee import postgres
from embeddings.fakes import HashingEncoder
from segments.schema import embedding_schema
from segments.switch import steps, status
from segments.switch.backfill import count_pending, run_backfill
from segments.switch.backfill.follow import Follower
from tests.conftest import PHASES, ROOT, database_url, migrate_segments, wait_until
from tests.embeddings.conftest import FAKE_BACKFILL, add_segments, scalar, segment_texts, sentences, stored_vectors
from tests.embeddings.test_server_restart import PrivateServer, private_server, query  # noqa: F401 (fixture)
from tests.migrations.test_live_swap import Writer

pytestmark = pytest.mark.django_db(transaction=True)


def current(column=None, encoder=None):
    """Whether every segment with text has its text's vector in `column` (the new model's by default)."""
    encoder = encoder or HashingEncoder()
    texts, vectors = segment_texts(), stored_vectors(column)
    for segment_id, text in texts.items():
        if not text.strip():
            continue
        vector = vectors.get(segment_id)
        if vector is None or float(vector @ encoder.encode_documents([text])[0]) < 0.999:
            return False
    return True


@contextmanager
def following(encoder=None, poll_seconds=2.0):
    """A follower in a thread of this process; its output lines."""
    with follower_running(encoder, poll_seconds=poll_seconds) as (_follower, lines):
        yield lines


@contextmanager
def follower_running(encoder=None, **options):
    """(a Follower running in a thread of this process, its output lines), once it follows; `options` go to
    the Follower (batch_size 100 unless given). Its own failure is raised when the block ends."""
    lines, stop, failures = [], threading.Event(), []
    follower = Follower(encoder or HashingEncoder(), **{"batch_size": 100, "poll_seconds": 2.0, **options},
                        say=lines.append, stop=stop)

    def run():
        try:
            follower.run()
        except BaseException as exc:  # a follower that dies is a failure of the test
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: any(line.startswith("Following") for line in lines), 30), lines
        yield follower, lines
    finally:
        stop.set()
        thread.join(10)
        connection.close()
        if failures:  # the follower's own failure explains whatever the test saw after it
            raise failures[0]
    assert not thread.is_alive()


def test_segments_inserted_and_edited_are_embedded_soon_after_their_commit(segments_at):
    segments_at("expanded")
    with following() as lines:
        started = time.monotonic()
        ids = add_segments(sentences(5))
        assert wait_until(lambda: count_pending() == 0, 5), lines
        first = time.monotonic() - started
        with connection.cursor() as cursor:
            cursor.execute("UPDATE segments SET text = text || ' (corrected)' WHERE id = ANY(%s)", [ids[:2]])
        assert wait_until(lambda: count_pending() == 0, 5), lines
    print(f"\nfirst rows embedded {first * 1000:.0f} ms after their commit")
    assert current()
    assert any("woken by NOTIFY segments_embedding" in line for line in lines)
    assert any(line.startswith("Writing segments.embedding_384") for line in lines)


def test_behind_a_pooler_it_polls_and_says_so(segments_at, monkeypatch):
    segments_at("expanded")

    def no_direct_session(*args, **kwargs):
        raise postgres.PoolerRefused("LISTEN needs a database session of its own")

    with monkeypatch.context() as patched:  # what private_connection says behind a pooler
        patched.setattr(postgres, "private_connection", no_direct_session)
        with following(poll_seconds=0.2) as lines:
            add_segments(sentences(3))
            assert wait_until(lambda: count_pending() == 0, 5), lines
            workers = status.collect()["backfill"]["workers"]
    assert any("polling every 0.2 s: DATABASE_URL goes through a pooler" in line for line in lines)
    assert [worker["mode"] for worker in workers] == ["follow (poll every 0.2 s)"]


def test_a_burst_of_5000_rows_in_one_transaction_is_embedded(segments_at):
    segments_at("expanded")
    with following() as lines:
        add_segments(sentences(5000, seed=3))
        assert wait_until(lambda: count_pending() == 0, 60), lines
    assert current()


def test_it_follows_its_model_through_the_swap_the_undo_and_the_contract(segments_at):
    segments_at("expanded")
    add_segments(sentences(200))
    run_backfill(HashingEncoder())
    steps.index()
    with following() as lines:
        with Writer(rate=10) as writer:
            time.sleep(1.0)
            swapped = steps.swap()
            time.sleep(1.0)
            steps.undo()
            time.sleep(1.0)
            steps.swap()
            time.sleep(1.0)
            steps.contract(confirmed=True)
            time.sleep(1.0)
        assert wait_until(lambda: count_pending() == 0, 10), lines
    assert writer.errors == [] and writer.writes > 30
    assert embedding_schema().phase == "final"
    swap = swapped.details
    print(f"\nswap with a follower: writes blocked {swap['writes_blocked_ms']:.1f} ms, reads blocked "
          f"{swap['reads_blocked_ms']:.1f} ms, {swap['left_pending']} left to the follower; "
          f"application writes {writer.writes}, slowest {writer.slowest * 1000:.0f} ms")
    assert "none was embedded under the lock" in swapped.message and swap["followers"]
    assert swap["embedded_after"] == 0 and writer.slowest < 1.0
    assert current("embedding")
    writes = [line for line in lines if line.startswith("Writing")]
    assert writes[0] == "Writing segments.embedding_384." and "Writing segments.embedding." in writes
    assert not [line for line in lines if "Pass stopped" in line]


def test_a_follower_of_the_replaced_model_stops_at_the_contract_and_waits(segments_at, sql):
    segments_at("expanded")
    add_segments(sentences(20))
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
    old = HashingEncoder(dimensions=1536)
    old.model_name = "the replaced model"
    with connection.cursor() as cursor:  # the replaced column as a model of this project would have written it
        cursor.execute("UPDATE embeddings_vector_column SET model_name = 'the replaced model', source = 'first write' "
                       "WHERE column_name = 'embedding_legacy' AND retired_at IS NULL")
    with following(old) as lines:
        steps.contract(confirmed=True)
        assert wait_until(lambda: any(line.startswith("Waiting:") for line in lines), 10), lines
    assert embedding_schema().phase == "final"
    assert any("this follower uses" in line for line in lines if line.startswith("Waiting:")), lines


def test_started_before_phase_1_it_waits_for_the_migration_then_follows(segments_at):
    segments_at("legacy")
    add_segments(sentences(20))
    lines, stop, failures = [], threading.Event(), []
    follower = Follower(HashingEncoder(), batch_size=100, poll_seconds=0.2, say=lines.append, stop=stop)

    def run():
        try:
            follower.run()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: lines, 10) and "run `python manage.py migrate`" in lines[0], lines
        time.sleep(1.0)
        assert len(lines) == 1 and not failures  # it says why once, and waits
        migrate_segments(PHASES["expanded"])  # a deploy's `migrate`, while it waits
        assert wait_until(lambda: any(line.startswith("Following") for line in lines), 20), (lines, failures)
        assert wait_until(lambda: count_pending() == 0, 20), lines
    finally:
        stop.set()
        thread.join(10)
        connection.close()
    assert not failures and not thread.is_alive()
    assert current()


def test_status_shows_each_follower_and_the_oldest_waiting_segment(segments_at, settings):
    segments_at("expanded")
    add_segments(sentences(10))
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
    with following() as lines:
        add_segments(sentences(3, seed=4))
        assert wait_until(lambda: count_pending() == 0, 5), lines
        # its heartbeat says what it did as it goes idle (a beat, at most BEAT_SECONDS after the commit)
        assert wait_until(lambda: status.collect()["backfill"]["workers"][0]["column"] == "embedding", 5)
        found = status.collect()
        shown = StringIO()
        call_command("embedding_status", stdout=shown)
    follower, = found["backfill"]["workers"]
    assert follower["mode"] == "follow (listen)" and follower["column"] == "embedding"
    assert follower["model"] == "hashing-384" and follower["last_batch_rows"] >= 1
    assert found["pending_age"] == {"embedding": None}
    # caught up, it runs for good: the next step does not wait for it to finish
    assert found["backfill"]["running"] is False and found["next"]["command"].endswith("contract --confirm")
    assert "once the running backfill finishes" not in found["next"]["why"]
    assert "(1 following)" in shown.getvalue() and "follow (listen)" in shown.getvalue()

    with connection.cursor() as cursor:  # a segment nobody embeds: it waits, and the status says for how long
        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES ('v', 0, 1, 'waiting')")
        cursor.execute("UPDATE segments_pending_since SET since = now() - interval '5 minutes'")
    found = status.collect()
    assert found["pending_age"]["embedding"] >= 300
    assert any("has waited 5 min" in warning and "no follower is running" in warning for warning in found["warnings"])


# The real command, in its own process.

@pytest.fixture
def follower_process():
    """Start the real command as `follower_process(*args, env=...)`; whatever is still running when the
    test ends (an assertion failed midway) gets SIGTERM, then SIGKILL after 10 s."""
    started_here = []

    def start(*args, env=None):
        full_env = {**os.environ, "DATABASE_URL": database_url(), **(env or {})}
        process = subprocess.Popen([sys.executable, str(FAKE_BACKFILL), "--follow", *args], env=full_env, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started_here.append(process)
        return process

    yield start
    for process in started_here:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def started(process, seconds=30):
    """Wait up to `seconds` for the follower's first line; the line."""
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    assert ready, f"the follower said nothing within {seconds} s"
    line = process.stdout.readline()
    assert "Following:" in line, (line, process.stderr.read() if process.poll() is not None else "")
    return line


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_it_within_five_seconds_with_exit_status_0(segments_at, follower_process, signal_number):
    segments_at("expanded")
    process = follower_process(env={"FAKE_ENCODER_DELAY": "0.5"})  # a batch in hand when the signal comes
    started(process)
    add_segments(sentences(50))
    time.sleep(0.3)

    sent = time.monotonic()
    process.send_signal(signal_number)
    out, err = process.communicate(timeout=10)
    took = time.monotonic() - sent

    assert process.returncode == 0, err
    assert took < 5.0, took
    assert f"{signal.Signals(signal_number).name}: stopping." in out and "Stopped" in out
    assert "Traceback" not in err
    assert scalar("SELECT count(*) FROM embeddings_backfill_claim") == 0  # nothing held


@pytest.mark.slow
def test_killed_outright_its_claims_die_and_another_follower_embeds_everything(segments_at, follower_process):
    segments_at("expanded")
    first = follower_process("--batch-size", "20", env={"FAKE_ENCODER_DELAY": "0.3"})
    started(first)
    add_segments(sentences(200, seed=5))
    assert wait_until(lambda: scalar("SELECT count(*) FROM embeddings_backfill_claim") > 0, 10)
    first.kill()
    first.wait(10)
    claimed = scalar("SELECT count(*) FROM embeddings_backfill_claim")

    second = follower_process("--batch-size", "50")
    started(second)
    assert wait_until(lambda: count_pending() == 0, 30)
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=10)
    assert claimed > 0 and current()
    assert scalar("SELECT count(*) FROM embeddings_backfill_claim") == 0


@pytest.mark.slow
def test_two_followers_share_arrivals_and_embed_each_row_once(expanded, write_log, follower_process, sql):
    # One write session each: two writing sessions are two followers.
    processes = [follower_process("--batch-size", "10", "--writers", "1", env={"FAKE_ENCODER_DELAY": "0.05"})
                 for _ in range(2)]
    for process in processes:
        started(process)
    for seed in range(6):
        add_segments(sentences(60, seed=seed))
        time.sleep(0.3)
    assert wait_until(lambda: count_pending() == 0, 30)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    outcomes = [process.communicate(timeout=10) for process in processes]
    writes = dict(sql("SELECT segment_id, count(*) FROM test_write_log GROUP BY segment_id"))
    writers = {pid for (pid,) in sql("SELECT DISTINCT pid FROM test_write_log")}
    assert len(writes) == 360 and set(writes.values()) == {1}, outcomes
    assert len(writers) == 2  # both shared the work
    assert current()


@pytest.mark.slow
def test_it_rides_out_a_server_restart_without_a_traceback(private_server, follower_process):  # noqa: F811
    process = follower_process("--poll-seconds", "0.5", env={"DATABASE_URL": private_server.url})
    started(process)
    insert = ("INSERT INTO segments (video_id, start_sec, end_sec, text) "
              "SELECT 'v', n, n + 1, 'text ' || n || ' of batch ' || %s FROM generate_series(1, 20) n")
    pending = "SELECT count(*) FROM segments WHERE embedding_384 IS NULL"
    query(private_server, insert + " RETURNING 1", ["one"])
    assert wait_until(lambda: query(private_server, pending)[0][0] == 0, 10)
    private_server.stop()
    time.sleep(3)
    private_server.start()
    query(private_server, insert + " RETURNING 1", ["two"])
    assert wait_until(lambda: query(private_server, pending)[0][0] == 0, 30)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "retrying" in err and "Traceback" not in err
    assert err.count("\n") < 40  # one line per retry, not a traceback each
