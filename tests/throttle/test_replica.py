"""The throttle against a real streaming replica whose replay is paused (tests/throttle/conftest.py):
the throttle itself, and `backfill_embeddings` in a process of its own, waiting for the replica while
`embedding_status` says so, then completing with every row embedded."""
import json
import threading
import time

import numpy as np
import pytest

from embeddings.fakes import HashingEncoder
from segments.switch.throttle import Throttle
from tests.conftest import wait_until
from tests.embeddings.conftest import sentences
from tests.throttle.conftest import REPLICA_NAME, manage_on, slow_backfill, stopped_on_leaving

pytestmark = pytest.mark.django_db(transaction=True)


def add_segments(standby, texts):
    """Insert segments with `texts` into the copy of the test database, as the application does; their ids."""
    rows = standby.query("INSERT INTO segments (video_id, start_sec, end_sec, text) SELECT 'video', n, n + 1, t "
                         "FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n RETURNING id", [list(texts)])
    return sorted(row[0] for row in rows)


COLUMN = "embedding_384"  # the new model's column in the expanded phase of the copy


def embedded(standby):
    return standby.query(f"SELECT count({COLUMN}) FROM segments")[0][0]


def test_a_batch_waits_while_a_paused_replica_falls_behind_and_goes_once_it_replays(replica):
    lines = []
    throttle = Throttle(lambda role: replica.connect(), max_replica_lag=1.0, say=lines.append)
    stop = threading.Event()
    try:
        assert throttle.before_write(100) is True  # caught up: at once
        replica.pause_replay()
        add_segments(replica, sentences(200))  # the application writes; the replica receives and does not apply
        assert wait_until(lambda: throttle.health().over is not None, 10)

        written = threading.Event()
        writer = threading.Thread(target=lambda: throttle.before_write(100, stop) and written.set())
        writer.start()
        assert not written.wait(1.5), lines
        waiting = throttle.waiting_for
        assert waiting.startswith(f"replica '{REPLICA_NAME}' on a local socket is ")
        assert waiting.endswith(" s behind (limit 1 s)")
        behind = throttle.health().over.seconds
        time.sleep(1.0)  # nothing more is written, nothing replayed: its lag still grows
        assert throttle.health().over.seconds >= behind + 0.5

        replica.resume_replay()
        assert written.wait(10), lines
        writer.join()
        assert throttle.waiting_for == "" and throttle.before_write(100) is True
    finally:
        stop.set()
        throttle.close()
    assert lines[0].startswith(f"Waiting: the backfill holds its writes back: replica '{REPLICA_NAME}' on a local "
                               "socket is ")
    assert lines[-1].startswith("Going on: the backfill writes again (it waited ") and len(lines) == 2


def test_without_a_lag_limit_a_lagging_replica_holds_nothing_back(replica):
    throttle = Throttle(lambda role: replica.connect(), max_replica_lag=None)
    try:
        replica.pause_replay()
        add_segments(replica, sentences(50))
        time.sleep(1.2)
        health = throttle.health()  # its first look: the server's own sample says how far behind
        assert [lag.replica.name for lag in health.lags] == [REPLICA_NAME] and health.lags[0].seconds > 0
        assert health.over is None and throttle.before_write(1000) is True
    finally:
        throttle.close()


def test_a_backfill_waits_for_a_replica_whose_replay_is_paused_and_completes_once_it_replays(replica):
    ids = add_segments(replica, sentences(20_000, words=8))
    replica.wait_caught_up()
    replica.pause_replay()

    process = slow_backfill(env={"BACKFILL_MAX_REPLICA_LAG": "1"}, rate=2000, url=replica.url)  # a slow GPU
    with stopped_on_leaving(process):
        started = wait_until(lambda: replica.query("SELECT 1 FROM segments_backfill_worker WHERE finished IS NULL"),
                             60)
        assert started, process.stderr.read() if process.poll() is not None else "the worker did not start"
        time.sleep(10.0)
        written, running = embedded(replica), process.poll() is None
        _, status_json, _ = manage_on(replica.url, "embedding_status", "--json")
        _, status_text, _ = manage_on(replica.url, "embedding_status")

        replica.resume_replay()
        resumed = time.monotonic()
        out, err = process.communicate(timeout=180)
        completed = time.monotonic() - resumed
    print(f"\nafter 10 s with the replica's replay paused: {written:,} of 20,000 rows written; "
          f"completed {completed:.1f} s after the resume")
    assert running and written <= 20_000 // 4
    [worker] = json.loads(status_json)["backfill"]["workers"]
    assert worker["waiting_for"].startswith(f"replica '{REPLICA_NAME}' on a local socket is ")
    assert worker["waiting_for"].endswith(" s behind (limit 1 s)")
    assert f"    waiting: replica '{REPLICA_NAME}' on a local socket is " in status_text

    assert process.returncode == 0, err
    assert f"Waiting: the backfill holds its writes back: replica '{REPLICA_NAME}' on a local socket is " in out
    assert "Going on: the backfill writes again (it waited " in out
    assert replica.query(f"SELECT count(*) FROM segments WHERE {COLUMN} IS NULL") == [(0,)]
    [(storage,)] = replica.query("SELECT atttypid::regtype::text FROM pg_attribute "
                                 "WHERE attrelid = 'segments'::regclass AND attname = %s", [COLUMN])
    sample = replica.query(f"SELECT text, {COLUMN}::real[] FROM segments WHERE id = ANY(%s)", [ids[::97]])
    encoder = HashingEncoder()
    for text, vector in sample:
        expected = encoder.encode_documents([text])[0]
        if storage == "halfvec":  # as the column holds it
            expected = expected.astype(np.float16).astype(np.float32)
        assert np.array_equal(np.array(vector, dtype=np.float32), expected)
