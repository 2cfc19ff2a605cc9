"""The backfill while the application writes, beside another worker, and through dropped connections."""
import logging
import random
import threading
from collections import Counter

import pytest
from django.db import connection, connections

from segments.switch.backfill import run_backfill
from segments.models import BackfillClaim
from tests.embeddings.conftest import add_segments, scalar, sentences
from tests.embeddings.encoders import RecordingEncoder
from tests.embeddings.test_backfill import assert_every_vector_is_its_texts

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.usefixtures("expanded")]


class Application(threading.Thread):
    """Updates, inserts and deletes segments through plain SQL until told to stop."""

    def __init__(self, ids, seed=0):
        super().__init__(name="application")
        self.ids, self.random = list(ids), random.Random(seed)
        self.stop = threading.Event()
        self.operations = Counter()

    def run(self):
        try:
            while not self.stop.wait(0.003):
                self.step()
        finally:
            connections["default"].close()  # this thread's own connection

    def step(self):
        text = " ".join(self.random.choice(sentences(50, seed=9)).split()[1:])
        with connection.cursor() as cursor:
            kind = self.random.choice(["update", "update", "update", "insert", "delete", "blank"])
            if kind == "insert":
                self.ids.extend(add_segments([f"new: {text}"]))
            elif kind == "delete":
                cursor.execute("DELETE FROM segments WHERE id = %s", [self.ids.pop(self.random.randrange(len(self.ids)))])
            else:
                new_text = "   " if kind == "blank" else f"edited {self.operations['update']}: {text}"
                cursor.execute("UPDATE segments SET text = %s WHERE id = %s", [new_text, self.random.choice(self.ids)])
        self.operations[kind] += 1


def test_while_the_application_edits_inserts_and_deletes_no_vector_is_stale_or_missing():
    ids = add_segments(sentences(1200))
    application = Application(ids)

    def progress(done, total):
        if done >= 0.7 * total:  # the application calms down before the end, so "none missing" is checkable
            application.stop.set()

    application.start()
    try:
        report = run_backfill(RecordingEncoder(delay=0.2), batch_size=25, progress=progress)
    finally:
        application.stop.set()
        application.join()
    assert application.operations["update"] > 50 and application.operations["insert"] > 10
    assert application.operations["delete"] > 10
    assert report.rows_remaining == 0
    assert_every_vector_is_its_texts()


def test_two_workers_share_the_table_and_encode_no_row_twice():
    add_segments(sentences(2000))
    encoders = [RecordingEncoder(delay=0.01), RecordingEncoder(delay=0.01)]
    reports = [None, None]

    def work(index):
        try:
            reports[index] = run_backfill(encoders[index], batch_size=40)
        finally:
            connections["default"].close()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    encoded = Counter(encoders[0].encoded + encoders[1].encoded)
    assert len(encoded) == 2000 and max(encoded.values()) == 1
    assert all(len(encoder.encoded) > 200 for encoder in encoders)  # both took a real share
    assert reports[0].rows_embedded + reports[1].rows_embedded == 2000
    assert_every_vector_is_its_texts()
    assert BackfillClaim.objects.count() == 0


def terminate(role):
    """pg_terminate_backend() the engine's `role` session on this test database; True if found."""
    return scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND datname = current_database()",
        [f"backfill_embeddings {role} %"],
    ) > 0


def test_dropped_connections_are_reopened_and_the_run_finishes(caplog):
    add_segments(sentences(400))
    killed = []

    def progress(done, total):  # runs in the writer thread, between two batches
        if done and len(killed) < 3:
            try:
                killed.append(terminate(["writer", "reader", "writer"][len(killed)]))
            finally:
                connections["default"].close()  # the writer thread's Django connection, opened just now

    with caplog.at_level(logging.WARNING, logger="segments.switch.backfill"):
        report = run_backfill(RecordingEncoder(delay=0.01), batch_size=20, progress=progress)
    assert killed == [True, True, True]
    assert (report.rows_embedded, report.rows_remaining) == (400, 0)
    assert_every_vector_is_its_texts()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any("backfill writer" in m for m in retries) and any("backfill reader" in m for m in retries)
    assert BackfillClaim.objects.count() == 0
