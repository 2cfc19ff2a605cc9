"""`manage.py embedding_switch STEP`: the operator's steps of the switch (segments/switch/steps.py).

    index                 build the HNSW index on the new column, without blocking
    swap                  embed what arrived since the last pass, then swap under a short lock; a NO-GO of the
                          evaluation (embedding_eval) is refused unless --accept-regression
    undo                  reverse the swap: the legacy column is searched again
    contract --confirm    give the legacy vectors' space back online, then drop the column (irreversible)
    drop-legacy-index     drop the legacy L2 IVFFlat index (no cosine query uses it) before the backfill
    rebuild-legacy-index  build it again, CONCURRENTLY, from its recorded definition
    pause [--reason TEXT] hold the switch's bulk writes back on every machine (backfill, contract, catch-up)
    resume                let them go on, each worker from the batch it held
"""
import json
import sys

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS

from askdrchaffee.postgres import PoolerRefused

from segments.schema import SchemaNotReady
from segments.switch import steps, throttle

STEPS = ["index", "swap", "undo", "contract", "drop-legacy-index", "rebuild-legacy-index", "pause", "resume"]


class Command(BaseCommand):
    help = ("Runs one operator step of the switch: index, swap, undo, contract, drop-legacy-index, "
            "rebuild-legacy-index; or pauses and resumes its bulk writes (pause, resume).")
    stealth_options = ("encoder",)

    def add_arguments(self, parser):
        parser.add_argument("step", choices=STEPS)
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS)
        parser.add_argument("--confirm", action="store_true", help="contract, drop-legacy-index: yes, do it.")
        parser.add_argument("--force", action="store_true", help="index: build even while many rows are pending.")
        parser.add_argument("--accept-regression", action="store_true",
                            help="swap: swap even though the evaluation (embedding_eval) says NO-GO.")
        parser.add_argument("--rows-per-transaction", type=int, default=None,
                            help="contract: the most legacy vectors cleared in one transaction (default 100).")
        parser.add_argument("--max-rows-per-second", type=throttle.rows_per_second_argument, default=None,
                            metavar="N",
                            help="contract: clear at most N legacy vectors a second (default: no cap).")
        parser.add_argument("--max-replica-lag", type=throttle.replica_lag_argument, default=throttle.SETTING,
                            metavar="SECONDS",
                            help="contract: wait while a streaming replica is more than SECONDS behind (default "
                                 "BACKFILL_MAX_REPLICA_LAG, 2; off: never).")
        parser.add_argument("--reason", default="", help="pause: why, for whoever looks at embedding_status.")
        parser.add_argument("--json", action="store_true", dest="as_json", help="Print the result as JSON on stdout.")

    def handle(self, *args, step, database, confirm, force, rows_per_transaction, as_json, **options):
        if rows_per_transaction is not None and rows_per_transaction < 1:
            raise CommandError("--rows-per-transaction must be at least 1.")
        quiet = options["verbosity"] < 1 or as_json
        progress = None if (quiet or not sys.stderr.isatty()) else _progress_bar
        say = (lambda line: None) if quiet else self.stdout.write
        try:
            result = self._run(step, database, confirm, force, rows_per_transaction, say, progress, options)
        except (SchemaNotReady, ImproperlyConfigured, PoolerRefused) as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(_json(result.as_dict()))
            return
        style = self.style.SUCCESS if result.done else self.style.NOTICE
        self.stdout.write(style(result.message))
        from segments.switch import status

        for line in result.brief if result.brief is not None else status.brief(using=database):
            self.stdout.write(f"  {line}")

    def _run(self, step, database, confirm, force, rows_per_transaction, say, progress, options):
        if step == "index":
            return steps.index(database, say, force=force)
        if step == "swap":
            return steps.swap(database, encoder=options.get("encoder"), accept_regression=options["accept_regression"])
        if step == "undo":
            return steps.undo(database)
        if step in ("pause", "resume"):
            return steps.pause(database, options["reason"]) if step == "pause" else steps.resume(database)
        if step == "contract":
            return steps.contract(database, say, confirmed=confirm, rows_per_transaction=rows_per_transaction,
                                  progress_factory=progress, max_rows_per_second=options["max_rows_per_second"],
                                  max_replica_lag=options["max_replica_lag"])
        from segments.switch import legacy_index

        if step == "drop-legacy-index":
            return legacy_index.drop_step(database, say, confirmed=confirm)
        return legacy_index.rebuild_step(database, say)


def _progress_bar(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", desc="clearing legacy vectors", file=sys.stderr)


def _json(value):
    return json.dumps(value, indent=2, default=str)
