"""The remote suite's work in a process of its own, on the database its DATABASE_URL names.

    python -m benchmark.remote_child build --rows N [--embed]     # a table at phase 1 (embedded, indexed)
    python -m benchmark.remote_child engine --simulated-gpu-rate R   # the engine's runs, as JSON on stdout

`build` makes a database ready for the suite: migrations, N demo segments loaded at the legacy phase
(with simulated legacy vectors), phase 1; with `--embed`, the new column filled by EMBEDDING_MODEL and
its HNSW index built. `engine` runs the backfill engine over the table twice, with the zero-cost
encoder and with a simulated GPU, emptying the new column before each, and prints each run's rows,
its pass's seconds and the whole call's (the worker's start included). Both run where DATABASE_URL
points: next to the database, or through the delay proxy.
"""
import argparse
import json
import os
import sys
import time


def setup_django():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "askdrchaffee.settings")
    import django

    django.setup()


def build(rows, embed):
    from django.core.management import call_command

    from segments.demo import drop_segments
    from segments.switch import gate, steps

    call_command("migrate", verbosity=0)
    drop_segments()
    gate.migrate_to("0001_initial")
    call_command("load_demo_segments", count=rows, verbosity=0)
    call_command("migrate", verbosity=0)
    if embed:
        call_command("backfill_embeddings", verbosity=0)
        steps.index()


def engine(rate):
    from django.db import connection

    from benchmark.encoders import SimulatedGpuEncoder
    from embeddings.fakes import HashingEncoder
    from embeddings.ledger import LEDGER
    from segments.schema import embedding_schema
    from segments.switch.backfill import run_backfill

    column = embedding_schema().vector_column
    runs = {}
    for key, encoder in (("zero_cost", HashingEncoder(384)), ("simulated_gpu", SimulatedGpuEncoder(384, rate))):
        with connection.cursor() as cursor:  # one message: the column empty again, its model forgotten
            cursor.execute(f"UPDATE segments SET {column} = NULL WHERE {column} IS NOT NULL; "
                           f"DELETE FROM {LEDGER} WHERE column_name = %s", [column])
        started = time.perf_counter()
        report = run_backfill(encoder)
        call_seconds = time.perf_counter() - started
        runs[key] = {"rows": report.rows_embedded, "pass_seconds": round(report.seconds, 3),
                     "call_seconds": round(call_seconds, 3), "writers": report.writers,
                     "round_trip_ms": report.round_trip_ms, "limited_by": report.limited_by,
                     "rows_per_s": round(report.rows_embedded / report.seconds, 1),
                     "rows_per_s_with_start": round(report.rows_embedded / call_seconds, 1)}
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("build", "engine"))
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--embed", action="store_true")
    parser.add_argument("--simulated-gpu-rate", type=float, default=20_000)
    args = parser.parse_args(argv)
    setup_django()
    if args.mode == "build":
        build(args.rows, args.embed)
    else:
        print(json.dumps(engine(args.simulated_gpu_rate)), flush=True)


if __name__ == "__main__":
    main()
