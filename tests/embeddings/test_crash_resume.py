"""`kill -9` at random moments, then resume: every segment ends with its text's vector, none missing.

The ten-kill run uses the HashingEncoder (each start of a process with the real model costs
several seconds here); its vectors are checked exactly. One kill with the real model follows.
"""
import json
import random
import signal
import time

import pytest

from segments.models import BackfillClaim
from tests.conftest import manage
from tests.embeddings.conftest import add_segments, fake_backfill, scalar, sentences, vector_column
from tests.embeddings.test_backfill import assert_every_vector_is_its_texts
from tests.embeddings.test_backfill_minilm import assert_vectors_are_the_models

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.usefixtures("expanded")]


def embedded():
    return scalar(f"SELECT count(*) FROM segments WHERE {vector_column()} IS NOT NULL")


def kill_once_it_writes(process, rng, most=0.5):
    """Once `process` has written a batch, SIGKILL it at a random moment within `most` seconds.

    Returns the number of claims its death left behind, or None if it finished first.
    """
    before = embedded()
    while process.poll() is None and embedded() == before:
        time.sleep(0.01)
    if process.poll() is not None:
        process.communicate()
        return None
    time.sleep(rng.uniform(0, most))  # claiming, encoding or writing: small batches, several in flight
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return BackfillClaim.objects.count()


def test_killed_ten_times_at_random_and_resumed_the_table_ends_exactly_right():
    add_segments(sentences(5000, seed=3, words=10) + ["", "  "])
    rng = random.Random(20240611)
    left_behind = [kill_once_it_writes(fake_backfill("--batch-size", "8", env={"FAKE_ENCODER_DELAY": "0.05"}), rng)
                   for _ in range(10)]
    assert None not in left_behind, "a run finished before it could be killed: make the table larger"
    assert sum(claims > 0 for claims in left_behind) >= 5  # the kills landed on batches in flight
    assert 0 < embedded() < 5000

    final = fake_backfill("--json")
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    report = json.loads(out)
    assert (report["rows_remaining"], report["rows_quarantined"], report["rows_blank"]) == (0, 0, 2)
    assert_every_vector_is_its_texts()
    assert BackfillClaim.objects.count() == 0  # the dead workers' claims were taken over


def test_killed_with_the_real_model_and_resumed_every_vector_is_the_models(minilm):
    add_segments(sentences(480, seed=4, words=10))  # a pass of a few seconds: the kill lands within its first 0.1 s
    claims = kill_once_it_writes(manage("backfill_embeddings", "--batch-size", "8"), random.Random(5), most=0.1)
    assert claims is not None and 0 < embedded() < 480
    final = manage("backfill_embeddings", "--json")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert json.loads(out)["rows_remaining"] == 0
    assert len(assert_vectors_are_the_models(minilm)) == 480
