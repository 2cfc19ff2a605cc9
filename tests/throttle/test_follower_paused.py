"""What a pause means for `backfill_embeddings --follow`: single arrivals are still embedded at once (new
segments stay searchable), a burst waits for the resume like the backfill."""
import threading
import time

import pytest
from django.db import connection

from embeddings.fakes import HashingEncoder
from segments.switch import throttle
from segments.switch.backfill import count_pending
from segments.switch.backfill.follow import FREE_ROWS, Follower
from tests.embeddings.conftest import add_segments, sentences

pytestmark = pytest.mark.django_db(transaction=True)


def wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_while_paused_a_follower_embeds_arrivals_and_holds_a_burst_until_the_resume():
    lines, stop, failures = [], threading.Event(), []
    follower = Follower(HashingEncoder(), batch_size=1000, poll_seconds=0.5, say=lines.append, stop=stop,
                        max_replica_lag=None)

    def run():
        try:
            follower.run()
        except BaseException as exc:  # a follower that dies is a failure of the test
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: any(line.startswith("Following") for line in lines), 30), lines
        throttle.pause(reason="peak traffic", by="ops-host:4242")

        add_segments(sentences(3))  # arrivals at the application's pace
        assert wait_until(lambda: count_pending() == 0, 10), lines

        add_segments(sentences(4 * FREE_ROWS, seed=7))  # a burst: one batch of more than FREE_ROWS rows
        time.sleep(2.0)
        assert count_pending() == 4 * FREE_ROWS, lines
        assert any(line.startswith("Waiting: the follower's catch-up holds its writes back: paused by ops-host:4242")
                   for line in lines)

        throttle.resume()
        assert wait_until(lambda: count_pending() == 0, 10), lines
    finally:
        stop.set()
        thread.join(10)
        connection.close()
    assert not failures, failures
    assert any(line.startswith("Going on: the follower's catch-up writes again") for line in lines)
