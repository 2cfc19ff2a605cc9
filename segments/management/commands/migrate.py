"""Django's `migrate`, made safe for a deploy to run at any moment (see segments/switch/gate.py).

A plain `manage.py migrate` applies what is quick and harmless (the expand phase, the
project's own tables, other apps), checks an existing `segments` table before phase 1 touches
it, never runs an operator step (index build, swap, undo, contract), then says where the switch
stands and which command comes next. An explicit target that needs an operator step is
refused with the command to run instead.
"""
from django.core.management.base import CommandError
from django.core.management.commands import migrate

from segments import operations
from segments.switch import gate


class Command(migrate.Command):
    help = (
        "Updates the database schema; never builds the vector index, swaps or drops by itself "
        "(those are `manage.py embedding_switch` steps)."
    )

    def handle(self, *args, **options):
        explicit = bool(options.get("app_label") and options.get("migration_name"))
        database = options["database"]
        executor_class = migrate.MigrationExecutor
        quiet = options["plan"] or options["check_unapplied"] or options["prune"] or options["verbosity"] < 1

        class Executor(gate.GatedMigrationExecutor):
            explicit_target = explicit

            def migration_plan(inner, targets, clean_start=False):  # noqa: N805
                plan = super().migration_plan(targets, clean_start)
                if not clean_start:
                    self._preflight(plan, database, options)
                return plan

        migrate.MigrationExecutor = Executor
        try:
            with operations.reporting_to(None if quiet else self.stdout):  # what an index build waits for
                super().handle(*args, **options)
        finally:
            migrate.MigrationExecutor = executor_class
        if not quiet:
            self._report(database)

    def _preflight(self, plan, database, options):
        """Before phase 1 changes an existing table: refuse a table the project cannot serve."""
        from segments.switch import preflight

        if options["plan"] or options["check_unapplied"]:
            return
        if not any(migration.app_label == "segments" and getattr(migration, "expands", False) and not backwards
                   for migration, backwards in plan):
            return
        report = preflight.inspect(using=database)
        refused = report.blocking
        if not options["fake_initial"]:  # an existing table not adopted yet: CREATE TABLE would fail
            refused = refused + [f for f in report.findings if f.code == "not_adopted"]
        if refused:
            raise CommandError(
                "Phase 1 refused, nothing was changed: the live `segments` table cannot be served as it "
                "is.\n" + preflight.Report(refused).as_text()
            )

    def _report(self, database):
        from segments.switch import status

        self.stdout.write(self.style.MIGRATE_HEADING("The embedding switch:"))
        for line in status.brief(using=database):
            self.stdout.write(f"  {line}")
