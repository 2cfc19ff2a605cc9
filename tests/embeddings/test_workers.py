"""Several workers at once, through PostgreSQL: all rows done, none embedded twice."""
import json
import time

import pytest
from django.db import connection

from tests.conftest import manage
from tests.embeddings.conftest import add_segments, fake_backfill, scalar, sentences
from tests.embeddings.test_backfill import assert_every_vector_is_its_texts

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.usefixtures("expanded")]


def writes_per_segment():
    """{segment id: times its vector was written} from the write_log fixture's table."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT segment_id, count(*) FROM test_write_log GROUP BY segment_id")
        return dict(cursor.fetchall())


def test_workers_2_splits_the_work_between_two_processes(write_log):
    # Each worker loads the model on its own (seconds apart on a busy machine): 1,500 rows are about 7 s of
    # work for each, so the later one still finds work left (300 were 1.5 s, which one worker could finish).
    ids = add_segments(sentences(1500, seed=5, words=10))
    process = manage("backfill_embeddings", "--workers", "2", "--batch-size", "10", "--json")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    report = json.loads(out)
    assert (report["workers"], report["rows_embedded"], report["rows_remaining"]) == (2, 1500, 0)
    assert len(report["rows_embedded_per_worker"]) == 2 and min(report["rows_embedded_per_worker"]) > 0
    assert writes_per_segment() == {segment_id: 1 for segment_id in ids}


def test_two_commands_started_separately_share_the_work(write_log):
    ids = add_segments(sentences(3000, seed=6))
    slow = {"FAKE_ENCODER_DELAY": "0.2"}  # per encode call (of up to 4 claims): the first runs ~7 s
    first = fake_backfill("--batch-size", "20", "--json", env=slow)
    while first.poll() is None and not scalar("SELECT count(*) FROM test_write_log"):
        time.sleep(0.02)  # the second starts once the first is well under way, as on another machine
    second = fake_backfill("--batch-size", "20", "--json", env=slow)
    reports = []
    for process in (first, second):
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        reports.append(json.loads(out))
    assert all(report["rows_embedded"] > 0 for report in reports)
    assert sum(report["rows_embedded"] for report in reports) == 3000
    assert writes_per_segment() == {segment_id: 1 for segment_id in ids}
    assert_every_vector_is_its_texts()
