"""The backfill engine in a process of its own, on the arrival suite's scratch copy (arrival.py
starts it; its resident memory is then the engine's own):

    python -m benchmark.arrival_child < config.json

The configuration (one JSON object on stdin) names the database (Django's settings for it), the
scratch schema, the mode, the model and the engine's batch size:

- `follow`: a Follower (segments/switch/backfill/follow.py) as `backfill_embeddings --follow` runs
  it, with its model loaded once, until SIGTERM or SIGINT; it exits 0 once stopped, at most
  follow.STOP_SECONDS after the signal (the batch in hand is then abandoned, as the command does).
- `once`: one `run_backfill` after loading the model, as one plain `backfill_embeddings` run (what a
  cron job starts each time).

Its engine connections come from `benchmark.backfill.connector`, which refuses any connection on
which the tables the engine (and the follower) name would resolve outside the scratch schema: it
writes nothing but the scratch copies. Before either mode it records its model in the scratch
schema's model ledger for the new column, whose copied segments hold placeholder vectors
(arrival.py): the follower then starts with nothing pending, as a caught-up deployment does.

It writes one JSON object per line on stdout: `loaded` (the model is loaded), `say` (a line of the
follower's output, with its mode), `report` (the once run's figures), `stopped` (the follower's end).
"""
import json
import os
import signal
import sys
import threading
import time

PLACEHOLDERS = "benchmark placeholders"  # the ledger's `source` for the copied segments' vectors
_emitting = threading.Lock()


def emit(event, **fields):
    line = json.dumps({"event": event, "at": time.time(), **fields})
    with _emitting:  # the follower's thread and the main thread both write
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def setup_django(database):
    """Django, on the database described by `database` (the parent's settings for it)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "askdrchaffee.settings")
    import django
    from django.conf import settings

    settings.DATABASES = {"default": database}
    django.setup()


def load_encoder(config):
    """The encoder, loaded now: a once run's time includes the model's load, as a cron job's does."""
    if config["encoder"] == "hashing":
        from embeddings.fakes import HashingEncoder

        return HashingEncoder(config["dimensions"])
    from embeddings.encoder import get_service

    service = get_service(config["device"], model_name=config["model"], dimensions=config["dimensions"])
    service.model  # noqa: B018 (loads it)
    return service


def record_model(connect, encoder):
    """Record the encoder's model for the scratch copy's new column (whose copied segments hold
    placeholder vectors) unless it is recorded already; ModelMismatch when another model is."""
    from embeddings import ledger
    from segments.schema import TABLE, require_vector_column, vector_column_types

    connection = connect("control")
    try:
        with connection, connection.cursor() as cursor:
            column = require_vector_column(cursor=cursor).vector_column
            storage = vector_column_types(cursor=cursor)[column][0]
            identity = ledger.identity_of(encoder)
            found = ledger.record(cursor, TABLE, column, identity, storage, PLACEHOLDERS)
            matched, cosine = ledger.same_model(identity, found.identity)
            if not matched:
                raise ledger.mismatch(TABLE, column, found, identity, cosine, "the benchmark's engine")
    finally:
        connection.close()


def follow(config, encoder, connect):
    """Run a Follower until SIGTERM or SIGINT (as the command's --follow does); the exit status."""
    from segments.switch.backfill import Tuning
    from segments.switch.backfill.follow import Follower, run_until_stopped

    stop = threading.Event()
    follower = None

    def say(line):
        listening = follower is not None and follower.listener is not None
        emit("say", line=line, mode=follower.mode if listening else None)

    follower = Follower(encoder, using="default", connect=connect, batch_size=config["batch_size"],
                        tuning=Tuning(), poll_seconds=config["poll_seconds"], say=say, stop=stop)

    signalled = []

    def handle(signum, frame):
        signalled.append((signal.Signals(signum).name, time.monotonic()))
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    failure, ended = run_until_stopped(follower, stop)
    since = time.monotonic() - signalled[0][1] if signalled else None
    emit("stopped", signal=signalled[0][0] if signalled else None, finished=ended,
         seconds_after_signal=since, failure=f"{type(failure).__name__}: {failure}" if failure else None)
    return 1 if failure else 0


def once(config, encoder, connect):
    """One pass of the engine, as a plain `backfill_embeddings` run makes it."""
    from segments.switch.backfill import run_backfill

    report = run_backfill(encoder, batch_size=config["batch_size"], connect=connect)
    emit("report", rows_embedded=report.rows_embedded, rows_remaining=report.rows_remaining,
         seconds=report.seconds, stages=report.stages, limited_by=report.limited_by)
    return 0


def main():
    started = time.monotonic()
    config = json.loads(sys.stdin.read())
    setup_django(config["database"])

    from benchmark.backfill import connector
    from benchmark.scratch import Scratch

    connect = connector(Scratch(config["schema"], "default", ()), tables=tuple(config["tables"]))
    encoder = load_encoder(config)
    emit("loaded", seconds=time.monotonic() - started, device=getattr(encoder, "device", None))
    record_model(connect, encoder)
    return (follow if config["mode"] == "follow" else once)(config, encoder, connect)


if __name__ == "__main__":
    sys.exit(main())
