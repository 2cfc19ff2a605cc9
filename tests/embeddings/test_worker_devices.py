"""`backfill_embeddings --workers N --devices ...`: each worker's device and rate in the report,
and --devices refused with the fix where no CUDA device is usable (the placement itself is
tested without a GPU in tests/unit/test_devices.py)."""
import json

import pytest
from django.core.management.base import CommandError

from tests.conftest import manage
from tests.embeddings.conftest import add_segments, command, sentences

pytestmark = pytest.mark.django_db(transaction=True)


def test_devices_without_a_usable_cuda_device_is_refused_with_the_fix(settings):
    settings.EMBEDDING_DEVICE = "cpu"
    with pytest.raises(CommandError, match="no CUDA device is usable here .*leave --devices out"):
        command("backfill_embeddings", "--devices", "0")


@pytest.mark.slow
def test_the_report_shows_each_workers_device_and_rate():
    add_segments(sentences(120, seed=3, words=8))
    process = manage("backfill_embeddings", "--workers", "2", "--batch-size", "20", "--json")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    report = json.loads(out)
    workers = report["per_worker"]
    assert [worker["worker"] for worker in workers] == [0, 1]
    assert [worker["device"] for worker in workers] == ["cpu", "cpu"]
    assert sum(worker["rows_embedded"] for worker in workers) == report["rows_embedded"] == 120
    assert all(worker["rows_per_second"] > 0 for worker in workers if worker["rows_embedded"])


@pytest.mark.slow
def test_the_human_report_has_a_line_per_worker():
    add_segments(sentences(40, seed=4, words=8))
    process = manage("backfill_embeddings", "--workers", "2", "--batch-size", "10")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "worker 0 on cpu:" in out and "worker 1 on cpu:" in out and "rows/s" in out
