"""What a pause means for `backfill_embeddings --follow`: single arrivals are still embedded at once (new
segments stay searchable), a burst waits for the resume like the backfill."""
import time

import pytest

from embeddings.fakes import HashingEncoder
from segments.switch import steps
from segments.switch.backfill import count_pending
from segments.switch.backfill.follow import FREE_ROWS
from tests.embeddings.conftest import add_segments, sentences
from tests.embeddings.test_follow import follower_running, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_while_paused_a_follower_embeds_arrivals_and_holds_a_burst_until_the_resume():
    with follower_running(HashingEncoder(), batch_size=1000, poll_seconds=0.5, max_replica_lag=None) as (_, lines):
        steps.pause(reason="peak traffic", by="ops-host:4242")

        add_segments(sentences(3))  # arrivals at the application's pace
        assert wait_until(lambda: count_pending() == 0, 10), lines

        add_segments(sentences(4 * FREE_ROWS, seed=7))  # a burst: one batch of more than FREE_ROWS rows
        time.sleep(2.0)
        assert count_pending() == 4 * FREE_ROWS, lines
        assert any(line.startswith("Waiting: the follower's catch-up holds its writes back: paused by ops-host:4242")
                   for line in lines)

        steps.resume()
        assert wait_until(lambda: count_pending() == 0, 10), lines
    assert any(line.startswith("Going on: the follower's catch-up writes again") for line in lines)
