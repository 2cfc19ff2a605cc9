"""Django's `migrate`, made safe for a deploy to run at any moment (see segments/switch/gate.py).

A plain `manage.py migrate` applies what is quick and harmless (the expand phase, the
project's own tables, other apps), checks an existing `segments` table before phase 1 touches
it, never runs an operator step (index build, swap, undo, contract), then says where the switch
stands and which command comes next. An explicit target that needs an operator step is
refused with the command to run instead.

This is the one place where the gate is installed: Django's command builds its executor from the
module's `MigrationExecutor`, with no other seam, so `handle` names the gated one there for the
length of the command.
"""
from contextlib import contextmanager

from django.core.management.commands import migrate

from segments import operations
from segments.switch import gate


class Command(migrate.Command):
    help = (
        "Updates the database schema; never builds the vector index, swaps or drops by itself "
        "(those are `manage.py embedding_switch` steps)."
    )

    def handle(self, *args, **options):
        quiet = options["plan"] or options["check_unapplied"] or options["prune"] or options["verbosity"] < 1
        self.out = None if quiet else self.stdout.write
        with _gated(self._executor(options)):
            super().handle(*args, **options)
        if not quiet:
            self._report(options["database"])

    def _executor(self, options):
        """The gated executor for this command: explicit targets refused, the pre-flight before phase 1."""
        command = self

        class Executor(gate.GatedMigrationExecutor):
            explicit_target = bool(options.get("app_label") and options.get("migration_name"))

            def migration_plan(self, targets, clean_start=False):
                plan = super().migration_plan(targets, clean_start)
                if not clean_start:
                    command._before(plan, options)
                    operations.report_builds_to(plan, command.out)
                return plan

        return Executor

    def _before(self, plan, options):
        """Before phase 1 changes an existing table: refuse a table the project cannot serve, and a
        concurrent build that would have to go through a pooler."""
        from segments.switch import preflight

        if options["plan"] or options["check_unapplied"]:
            return
        preflight.before_migrating(plan, options["database"], options["fake_initial"])

    def _report(self, database):
        from segments.switch import status

        self.stdout.write(self.style.MIGRATE_HEADING("The embedding switch:"))
        for line in status.brief(using=database):
            self.stdout.write(f"  {line}")


@contextmanager
def _gated(executor_class):
    original = migrate.MigrationExecutor
    migrate.MigrationExecutor = executor_class
    try:
        yield
    finally:
        migrate.MigrationExecutor = original
