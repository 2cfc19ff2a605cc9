"""`embedding_switch pause` / `resume` stop and restart the writes of a backfill running in another
process, through the database, within 2 s each, and the backfill loses nothing."""
import json
import time

import numpy as np
import pytest
from django.db import connection

from embeddings.fakes import HashingEncoder
from tests.conftest import as_stored, wait_until
from tests.embeddings.conftest import add_segments, command, scalar, sentences
from tests.throttle.conftest import slow_backfill, stopped_on_leaving

pytestmark = pytest.mark.django_db(transaction=True)

TAKES_EFFECT_SECONDS = 2.0  # what the operator is promised, each way


def embedded():
    return scalar("SELECT count(embedding) FROM segments")


def test_pause_and_resume_stop_and_restart_a_backfill_in_another_process_within_2_s():
    ids = add_segments(sentences(3000, words=8))
    process = slow_backfill("--batch-size", "50", env={"BACKFILL_MAX_REPLICA_LAG": "off"}, rate=500)
    with stopped_on_leaving(process):
        assert wait_until(lambda: embedded() >= 300, 60), process.stderr.read() if process.poll() is not None else ""

        paused_at = time.monotonic()
        command("embedding_switch", "pause", "--reason", "peak traffic")
        counts = []  # (seconds after the pause, rows embedded)
        while time.monotonic() - paused_at < 2 * TAKES_EFFECT_SECONDS:
            counts.append((time.monotonic() - paused_at, embedded()))
            time.sleep(0.05)
        last_write = max((seconds for (seconds, rows), (_, before) in zip(counts[1:], counts) if rows != before),
                         default=0.0)
        held = counts[-1][1]
        workers = json.loads(command("embedding_status", "--json")[0])["backfill"]["workers"]

        resumed_at = time.monotonic()
        command("embedding_switch", "resume")
        moved = wait_until(lambda: embedded() > held, 10, every=0.02)
        first_write = time.monotonic() - resumed_at
        out, err = process.communicate(timeout=60)

    print(f"\npause: last commit {last_write:.2f} s after it; resume: first commit {first_write:.2f} s after it")
    assert last_write <= TAKES_EFFECT_SECONDS and held < len(ids)
    assert [rows for seconds, rows in counts if seconds >= TAKES_EFFECT_SECONDS and rows != held] == []
    [worker] = workers
    assert worker["waiting_for"].startswith("paused by ") and worker["waiting_for"].endswith(" UTC (peak traffic)")
    assert moved and first_write <= TAKES_EFFECT_SECONDS
    assert process.returncode == 0, err
    assert "Waiting: the backfill holds its writes back: paused by " in out and "Going on: " in out
    assert scalar("SELECT count(*) FROM segments WHERE embedding IS NULL") == 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT text, embedding::real[] FROM segments WHERE id = ANY(%s)", [ids[::31]])
        sample = cursor.fetchall()
    encoder = HashingEncoder()
    for text, vector in sample:
        assert np.array_equal(np.array(vector, dtype=np.float32), as_stored(encoder.encode_documents([text])[0]))
