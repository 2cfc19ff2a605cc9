"""The backfill engine in a process of its own, beside the live-site suite's application (live_site.py
starts it, so that the application's latency is not the engine's threads' in the same process):

    python -m benchmark.live_site_child < config.json

The configuration (one JSON object on stdin) names the database (Django's settings for it), the
scratch schema and the tables that must resolve there, the engine's batch size, the vectors' width,
and the run's throttle: `max_rows_per_second` (null: no cap) and `max_replica_lag` (seconds, null for
no limit, or "setting" for BACKFILL_MAX_REPLICA_LAG). The encoder is the zero-cost HashingEncoder:
the backfill writes as fast as the database takes it, the case that weighs most on the site.

Its connections come from `benchmark.backfill.connector`, which refuses any connection on which the
engine's tables would resolve outside the scratch schema: it writes nothing but the scratch copy.
It writes one JSON object per line on stdout: `started` (the engine starts), `say` (a line of the
throttle's: when it waits and why, when it goes on), `report` (the run's figures, when it ends).
"""
import json
import sys
import time

from benchmark.arrival_child import emit, setup_django


def main():
    config = json.loads(sys.stdin.read())
    setup_django(config["database"])

    from benchmark.backfill import connector
    from benchmark.scratch import Scratch
    from embeddings.fakes import HashingEncoder
    from segments.switch import throttle
    from segments.switch.backfill import run_backfill

    connect = connector(Scratch(config["schema"], "default", ()), tables=tuple(config["tables"]))
    lag = config["max_replica_lag"]
    emit("started")
    started = time.monotonic()
    report = run_backfill(HashingEncoder(config["dimensions"]), batch_size=config["batch_size"], connect=connect,
                          max_rows_per_second=config["max_rows_per_second"],
                          max_replica_lag=throttle.SETTING if lag == "setting" else lag,
                          say=lambda line: emit("say", line=line))
    emit("report", rows_embedded=report.rows_embedded, rows_remaining=report.rows_remaining,
         seconds=time.monotonic() - started, limited_by=report.limited_by)
    return 0


if __name__ == "__main__":
    sys.exit(main())
