"""`manage.py makeswitch`: write the migrations of the next switch (segments/switch/migrations_writer.py).

The next model is the one the settings name: EMBEDDING_MODEL, EMBEDDING_DIMENSIONS, and
EMBEDDING_STORAGE for the new column's type. It refuses, writing nothing, while a switch is under
way, while a switch's migrations are written but not applied, and when the live column holds that
model already (the model ledger). Then the runbook runs the switch, from `manage.py migrate` on.
"""
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.loader import MigrationLoader

from embeddings import ledger
from segments.schema import LIVE, TABLE, SchemaNotReady, embedding_schema
from segments.storage import configured
from segments.switch import gate, migrations_writer, status


class Command(BaseCommand):
    help = "Writes the migrations of the next switch, to the model EMBEDDING_MODEL (width and storage from the settings)."

    def add_arguments(self, parser):
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS, help='Database alias. Default "default".')
        parser.add_argument("--dry-run", action="store_true", help="Show the migrations without writing them.")

    def handle(self, *args, database, dry_run, **options):
        loader = MigrationLoader(connections[database])
        self._check(loader, database)
        storage = configured(connections[database]).type_name  # EMBEDDING_STORAGE, else halfvec where pgvector has it
        switch = migrations_writer.next_switch(loader, settings.EMBEDDING_MODEL, settings.EMBEDDING_DIMENSIONS, storage)
        heading = (f"Switch {switch.number}: to {switch.model} ({switch.dimensions} dims, {switch.storage}), "
                   f"from what segments.{LIVE} holds now.")
        if dry_run:
            self.stdout.write(self.style.MIGRATE_HEADING(heading + " Nothing was written:"))
            for file_name, text in migrations_writer.render(switch).items():
                self.stdout.write(self.style.MIGRATE_LABEL(f"\n# {file_name}\n") + text)
            return
        paths = migrations_writer.write(switch, migrations_writer.directory())
        self.stdout.write(self.style.SUCCESS(heading + " Wrote:"))
        for path in paths:
            self.stdout.write(f"  {path.relative_to(settings.BASE_DIR) if path.is_relative_to(settings.BASE_DIR) else path}")
        self.stdout.write(
            f"Review them (`python manage.py sqlmigrate segments {switch.names[0][:4]}`), commit them with the code and "
            f"deploy; `{status.COMMANDS['migrate']}` then starts the switch (phase 1), and the runbook goes on from there."
        )

    def _check(self, loader, database):
        """CommandError, writing nothing, when the next switch cannot be written now."""
        written = [migration.name for (app, name), migration in loader.graph.nodes.items()
                   if app == gate.APP and getattr(migration, "switch", None) and (app, name) not in
                   loader.applied_migrations and getattr(migration, "expands", False)]
        if written:
            raise CommandError(f"A switch is written but not started ({', '.join(sorted(written))}): run "
                               f"`{status.COMMANDS['migrate']}` to start it, or delete its migrations. Nothing was written.")
        try:
            schema = embedding_schema(database)
        except SchemaNotReady as exc:
            raise CommandError(f"{exc} Nothing was written.") from exc
        if schema.phase == "legacy":
            raise CommandError("The first switch has not run yet (phase legacy): its migrations are the project's own; "
                               f"follow the runbook from `{status.COMMANDS['migrate']}`. Nothing was written.")
        if schema.phase != "final":
            raise CommandError(f"A switch is under way (phase {schema.phase}): finish it "
                               f"(`{status.COMMANDS['contract']}`) before writing the next. Nothing was written.")
        with connections[database].cursor() as cursor:
            recorded = ledger.entry(cursor, TABLE, LIVE)
        if recorded is not None and recorded.identity.name == settings.EMBEDDING_MODEL:
            raise CommandError(
                f"segments.{LIVE} holds {recorded.identity} already: there is nothing to switch. Set EMBEDDING_MODEL, "
                "EMBEDDING_DIMENSIONS (and EMBEDDING_STORAGE) to the model to switch to. Nothing was written.")
