"""`embedding_benchmark --suite live-site`: the application's latency alone, beside an unthrottled
backfill and beside a throttled one, on scratch copies only; the throttled backfill keeps to its cap."""
import json
from io import StringIO

import pytest
from django.core.management import call_command

from benchmark import live_site, report
from benchmark.scratch import scratch_schemas
from segments.models import BackfillWorker
from tests.benchmark.test_benchmark import LIVE_TEXTS, add_live_segments, live_state

pytestmark = pytest.mark.django_db(transaction=True)

TINY = ["--rows", "3000", "--live-seconds", "3", "--live-rate-cap", "400", "--live-ops", "10"]


@pytest.mark.slow
def test_a_tiny_run_measures_three_phases_keeps_the_cap_and_leaves_the_live_tables_as_they_were():
    add_live_segments(LIVE_TEXTS)
    before = live_state()
    out = StringIO()

    call_command("embedding_benchmark", "--suite", "live-site", *TINY, "--json", stdout=out, stderr=StringIO())

    results = json.loads(out.getvalue())
    figures = results["live_site"]
    assert set(results) == {"machine", "live_site", "run"}
    phases = figures["phases"]
    assert set(phases) == set(live_site.PHASES) and "backfill" not in phases["idle"]
    for side in phases.values():
        for kind in live_site.KINDS:
            latency = side["latency_ms"][kind]
            assert latency["count"] == side["rounds"] > 0
            assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert side["wal_bytes"] > 0
    unthrottled, throttled = phases["unthrottled"]["backfill"], phases["throttled"]["backfill"]
    assert unthrottled["rows_written"] > 0 and unthrottled["max_rows_per_second"] is None
    assert unthrottled["wal_bytes_per_row"] > 0
    # the cap: at most one second's worth at once, then 400 rows a second, in batches of at most 1,000
    assert 0 < throttled["rows_written"] <= 400 * (phases["throttled"]["seconds"] + 1) + 1000
    assert throttled["throttle_said"] == ["Rate cap: the backfill writes at most 400 rows/s."]
    assert figures["throttled_read_p95_ms"] == phases["throttled"]["latency_ms"]["read"]["p95"]

    text = "\n".join(report.render(results))
    assert "live-site: the application's latency (ms, p50 / p95 / p99) beside the backfill" in text
    assert "beside an unthrottled backfill" in text and "throttled: --max-rows-per-second 400" in text
    assert scratch_schemas() == [] and live_state() == before
    assert not BackfillWorker.objects.exists()  # the engine's heartbeats went to the scratch copies
