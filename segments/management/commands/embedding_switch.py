"""`manage.py embedding_switch STEP`: the operator's steps of the switch (segments/switch/steps.py).

    index                 build the HNSW index on the new column, without blocking
    swap                  embed what arrived since the last pass, then swap under a short lock
    undo                  reverse the swap: the legacy column is searched again
    contract --confirm    give the legacy vectors' space back online, then drop the column (irreversible)
    drop-legacy-index     drop the legacy L2 IVFFlat index (no cosine query uses it) before the backfill
    rebuild-legacy-index  build it again, CONCURRENTLY, from its recorded definition
"""
import json
import sys
from io import StringIO

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS

from segments.schema import SchemaNotReady
from segments.switch import steps

STEPS = ["index", "swap", "undo", "contract", "drop-legacy-index", "rebuild-legacy-index"]


class Command(BaseCommand):
    help = "Runs one operator step of the switch: index, swap, undo, contract, drop-legacy-index or rebuild-legacy-index."
    stealth_options = ("encoder",)

    def add_arguments(self, parser):
        parser.add_argument("step", choices=STEPS)
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS)
        parser.add_argument("--confirm", action="store_true", help="contract, drop-legacy-index: yes, do it.")
        parser.add_argument("--force", action="store_true", help="index: build even while many rows are pending.")
        parser.add_argument("--batch-size", type=int, default=None, help="contract: the most legacy vectors cleared per transaction.")
        parser.add_argument("--json", action="store_true", dest="as_json", help="Print the result as JSON on stdout.")

    def handle(self, *args, step, database, confirm, force, batch_size, as_json, **options):
        if batch_size is not None and batch_size < 1:
            raise CommandError("--batch-size must be at least 1.")
        quiet = options["verbosity"] < 1 or as_json
        progress = None if (quiet or not sys.stderr.isatty()) else _progress_bar
        migrate_out = StringIO() if quiet else self.stdout  # call_command would fall back to sys.stdout
        try:
            result = self._run(step, database, confirm, force, batch_size, migrate_out, progress, options)
        except SchemaNotReady as exc:
            raise CommandError(str(exc)) from exc
        if as_json:
            self.stdout.write(_json(result.as_dict()))
            return
        style = self.style.SUCCESS if result.done else self.style.NOTICE
        self.stdout.write(style(result.message))
        from segments.switch import status

        for line in status.brief(using=database):
            self.stdout.write(f"  {line}")

    def _run(self, step, database, confirm, force, batch_size, migrate_out, progress, options):
        if step == "index":
            return steps.index(database, migrate_out, force=force)
        if step == "swap":
            from embeddings.encoder import get_service

            return steps.swap(database, migrate_out, encoder=options.get("encoder") or get_service())
        if step == "undo":
            return steps.undo(database, migrate_out)
        say = migrate_out.write
        if step == "contract":
            return steps.contract(database, migrate_out, confirmed=confirm, batch_size=batch_size,
                                  progress_factory=progress, out=say)
        from segments.switch import legacy_index

        if step == "drop-legacy-index":
            return legacy_index.drop_step(database, say, confirmed=confirm)
        return legacy_index.rebuild_step(database, say)


def _progress_bar(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", desc="clearing legacy vectors", file=sys.stderr)


def _json(value):
    return json.dumps(value, indent=2, default=str)
