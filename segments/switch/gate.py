"""Which migrations a plain `manage.py migrate` may run, and how an operator step runs its own.

A deploy runs `manage.py migrate` at any moment. It must only ever do what is quick and
harmless: the expand phase, the project's own tables, other apps. The steps that are slow, that
change what the application searches, or that destroy data (building the vector index, the
swap and its undo, the contract) are marked on their migration with `operator_step`, and:

- `GatedMigrationExecutor`, which the project's `migrate` command uses (its one place), leaves
  them out of a plain plan, and whatever depends on them, and refuses an explicit target that
  needs one (`migrate segments 0007`, or back past one), naming the command to run instead,
  before anything changes;
- `apply_step(step)`, which `manage.py embedding_switch STEP` calls, applies the one migration of
  that step for the switch under way, with Django's own executor and an explicit plan, handing
  the migration's operation the inputs the command prepared, then the harmless migrations that
  waited for it (a plain `migrate` has nothing left to do after a step). The swap and its undo are
  the exception, with the contract's drop of the column: their migration is applied as ONE message
  from the table's lock to the commit, the migration's record in it (segments/switch/swap.py,
  contract.py), under lock retries: Django's executor would wait for client round trips (its
  record, its commit) while the table is locked. The drop's message also records the migrations
  that only waited for it, when none of them has anything to run (0010 and 0012 of the first switch).

Each switch's migrations carry its number (`switch = N`): the first switch is 0003-0008, a later
one is written by `manage.py makeswitch`. The switch under way is the latest whose expand
migration is applied.
"""
from dataclasses import dataclass

from django.core.management.base import CommandError
from django.db import connections

from askdrchaffee import postgres, round_trips
from segments.operations import LockRetryingExecutor, bind, report_builds_to

APP = "segments"
STEPS = {
    # step: (what it is, the command that runs it)
    "index": ("the HNSW index build", "manage.py embedding_switch index"),
    "swap": ("the swap", "manage.py embedding_switch swap"),
    "undo": ("the undo of the swap", "manage.py embedding_switch undo"),
    "contract": ("the contract (drops the legacy column for good)", "manage.py embedding_switch contract"),
}


def step_of(migration, backwards):
    """The operator step applying (or, `backwards`, unapplying) `migration` is; None if none."""
    step = getattr(migration, "operator_step", None)
    if step is None:
        return None
    if backwards:
        return getattr(migration, "undo_step", step)
    return step


class GatedMigrationExecutor(LockRetryingExecutor):
    """A MigrationExecutor whose plans leave out (plain migrate) or refuse (explicit targets)
    every operator step; each migration it applies runs under lock retries."""

    explicit_target = False  # set by the migrate command: the operator named a migration

    def migration_plan(self, targets, clean_start=False):
        plan = super().migration_plan(targets, clean_start)
        if clean_start:
            return plan  # the full plan Django renders states from, not what it applies
        blocked = [(migration, backwards) for migration, backwards in plan if step_of(migration, backwards)]
        if not blocked:
            return plan
        if self.explicit_target:
            migration, backwards = blocked[0]
            what, command = STEPS[step_of(migration, backwards)]
            raise CommandError(
                f"{'Unapplying' if backwards else 'Applying'} {migration.app_label}.{migration.name} is "
                f"{what}, an operator step that `migrate` never runs by itself. Run `{command}`: it checks "
                "that the step is safe now, runs it and says what comes next. Nothing was changed."
            )
        return _without(plan, blocked)

    def detect_soft_applied(self, project_state, migration):
        """`--fake-initial` for segments.0001 whenever the table exists, whatever its columns.

        Django fakes an initial migration only when every column it creates exists; a real
        deployment's table has columns renamed or added by its own history. The pre-flight
        check, which `migrate` runs before phase 1, decides whether the project can serve it.
        """
        applied, state = super().detect_soft_applied(project_state, migration)
        if applied or (migration.app_label, migration.name) != (APP, "0001_initial"):
            return applied, state
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('segments') IS NOT NULL")
            exists = cursor.fetchone()[0]
        if not exists:
            return False, state
        after = migration.mutate_state(project_state) if project_state is not None else \
            self.loader.project_state((migration.app_label, migration.name), at_end=True)
        return True, after


def _without(plan, blocked):
    """`plan` less the `blocked` entries and every later entry that depends on one of them."""
    removed = {(m.app_label, m.name) for m, _ in blocked}
    kept = []
    for migration, backwards in plan:
        key = (migration.app_label, migration.name)
        depends = any(tuple(dep[:2]) in removed for dep in migration.dependencies)
        if key in removed or (not backwards and depends):
            removed.add(key)
            continue
        kept.append((migration, backwards))
    return kept


# --- the switches' migrations -------------------------------------------------------------------

def switches(loader):
    """{switch number: {"expand" | "index" | "swap" | "contract": Migration}} of the segments app."""
    found = {}
    for (app, _name), migration in loader.graph.nodes.items():
        number = getattr(migration, "switch", None)
        if app != APP or number is None:
            continue
        kind = "expand" if getattr(migration, "expands", False) else getattr(migration, "operator_step", None)
        if kind:
            found.setdefault(number, {})[kind] = migration
    return found


def current_switch(loader):
    """The number of the switch under way: the latest whose expand migration is applied (1 before
    any)."""
    applied = [number for number, steps in switches(loader).items()
               if "expand" in steps and (APP, steps["expand"].name) in loader.applied_migrations]
    return max(applied, default=1)


def apply_step(step, using="default", inputs=None, out=None):
    """Apply (the undo: unapply) the migration of operator step `step` for the switch under way, and
    nothing else, with Django's executor; `inputs` go to its SwapEmbedding operation, `out` (a
    command's output) to its concurrent builds. The migration; False when it had been applied (or
    unapplied) already, and nothing was done."""
    executor = LockRetryingExecutor(connections[using])
    _require_plain_migrate_done(executor)
    migrations = switches(executor.loader)[current_switch(executor.loader)]
    migration = migrations["swap" if step == "undo" else step]
    backwards = step == "undo"
    if ((APP, migration.name) in executor.loader.applied_migrations) != backwards:
        return False
    if step in ("swap", "undo"):
        _apply_locked(migration, using, inputs, forward=not backwards)
    elif step == "contract":
        return drop_legacy(ContractPlan.of(migration, executor.loader), using, record=inputs)
    else:
        bind(migration, inputs=inputs, out=out)
        executor.migrate([(APP, migration.name)], plan=[(migration, backwards)])
    if not backwards:
        _apply_what_waited_for(migration, using)
    return migration


@dataclass
class ContractPlan:
    """The switch's contract migration, and the migrations with nothing to run that wait for it (recorded
    with it), as the recorded migrations say when it is planned."""

    migration: object
    recorded: list

    @classmethod
    def of(cls, migration, loader):
        waiting = _waiting_for(migration, loader)
        return cls(migration, waiting if all(map(_records_only, waiting)) else [])


def contract_plan(applied, using="default"):
    """The ContractPlan of the switch under way, from `applied` (the recorded migrations, read with the
    contract's other reads before it changes anything); CommandError while a plain `migrate` has work
    left, or when its migration is recorded already (while the legacy column is there)."""
    executor = executor_from(applied) or LockRetryingExecutor(connections[using])
    _require_plain_migrate_done(executor)
    migration = switches(executor.loader)[current_switch(executor.loader)]["contract"]
    if (APP, migration.name) in executor.loader.applied_migrations:
        before = next((name for app, name in migration.dependencies if app == APP), "zero")
        raise CommandError(f"{APP}.{migration.name} is recorded as applied, and the legacy column it drops is still "
                           f"there: the record was made by hand. Unrecord it (`manage.py migrate {APP} {before} "
                           "--fake`), then run the contract again. Nothing was changed.")
    return ContractPlan.of(migration, executor.loader)


def drop_legacy(plan, using="default", record=None, reads=()):
    """The contract's migration of `plan` (a ContractPlan), the legacy column dropped, in one message with its
    record, the records of the migrations that wait for it and the contract's SwitchEvent (`record`, a
    contract.Record), and `reads` (queries) after them; then the migrations that wait for it and have work
    to do. The answers of `reads` (round_trips.reads), None when migrations ran after them."""
    answers = _drop_in_one_message(plan.migration, using, plan.recorded, record, reads)
    if not plan.recorded:
        _apply_what_waited_for(plan.migration, using)
        return None
    return answers


CATALOG_ATTEMPTS = 3  # the swap's message written again when an index or a view changed under it


def _apply_locked(migration, using, inputs, *, forward):
    """The swap (or its undo) of `migration` as one message, its record included, under lock retries."""
    from segments.operations import giving_up_on_locks, segments_lock_holders
    from segments.switch import swap

    inputs = inputs or swap.SwapInputs()
    inputs.migration = (APP, migration.name)
    columns = swap.Columns(swap_operation(migration).next_column)

    def attempt(lock_timeout):
        inputs.lock_timeout = lock_timeout
        for number in range(1, CATALOG_ATTEMPTS + 1):
            try:
                return swap.run_locked(connections[using], columns, inputs, forward=forward)
            except swap.CatalogMoved:
                if number == CATALOG_ATTEMPTS:
                    raise

    with giving_up_on_locks():
        postgres.with_lock_retries(attempt, what="The swap" if forward else "The undo",
                                   holders=lambda: segments_lock_holders(connections[using]))


def _drop_in_one_message(migration, using, waiting=(), record=None, reads=()):
    """The contract's migration (the legacy column dropped) as one message, its record included (and the
    records of `waiting`, migrations with nothing to run that wait for it, the contract's SwitchEvent,
    `record`, a contract.Record, when given, and `reads` after them: their answers), under lock retries: its
    ACCESS EXCLUSIVE lasts as long as the server's own work. A view made on the legacy column meanwhile stops
    it: ContractRefused, naming the view."""
    from django.db.utils import DatabaseError
    from psycopg2 import errors

    from segments.operations import giving_up_on_locks, segments_lock_holders
    from segments.switch import contract

    def attempt(lock_timeout):
        with connections[using].cursor() as cursor:
            try:
                cursor.execute(contract.drop_statements(cursor, lock_timeout, (APP, migration.name),
                                                        [(m.app_label, m.name) for m in waiting], record, reads))
            except DatabaseError as exc:
                if isinstance(exc.__cause__, errors.DependentObjectsStillInUse):
                    contract.refuse_dependent_views(cursor)
                raise
            if record is None and not reads:
                return []
            answers = round_trips.answers(cursor.fetchone())
            if record is not None:
                record.written(answers.pop(0))
            return answers

    with giving_up_on_locks():
        return postgres.with_lock_retries(attempt, what="The contract's drop of the legacy column",
                                          holders=lambda: segments_lock_holders(connections[using]))


def _waiting_for(step_migration, loader):
    """The migrations a plain `migrate` would apply once `step_migration` is (those that depend on it), in
    order; [] when one of them needs a migration that is not applied."""
    key = (APP, step_migration.name)
    dependents, waiting = set(loader.graph.backwards_plan(key)), []
    applied = set(loader.applied_migrations) | {key}
    for leaf in loader.graph.leaf_nodes():
        for node in loader.graph.forwards_plan(leaf):
            if node not in dependents or node in applied:
                continue
            migration = loader.graph.nodes[node]
            if step_of(migration, False) or not all(tuple(dep[:2]) in applied for dep in migration.dependencies):
                return []
            waiting.append(migration)
            applied.add(node)
    return waiting


def _records_only(migration):
    """True when applying `migration` writes nothing but its record (no operation, or state only)."""
    from django.db.migrations.operations import SeparateDatabaseAndState

    return all(isinstance(operation, SeparateDatabaseAndState) and not operation.database_operations
               for operation in migration.operations)


def swap_operation(migration):
    """The SwapEmbedding operation of a switch's swap migration."""
    from segments.operations import SwapEmbedding

    for operation in migration.operations:
        for inner in (operation, *getattr(operation, "database_operations", ())):
            if isinstance(inner, SwapEmbedding):
                return inner
    raise ValueError(f"{migration.app_label}.{migration.name} has no SwapEmbedding operation")


def _apply_what_waited_for(step_migration, using):
    """Apply the harmless migrations that waited for `step_migration` (those a plain `migrate` would now
    apply and that depend on it: 0010, which joins the end of the first switch to later migrations), so
    that the step leaves nothing for a plain `migrate` to do, as it found it."""
    executor = GatedMigrationExecutor(connections[using])
    after = set(executor.loader.graph.backwards_plan((APP, step_migration.name)))  # what depends on it
    plan = [(migration, backwards) for migration, backwards in executor.migration_plan(executor.loader.graph.leaf_nodes())
            if (migration.app_label, migration.name) in after and not backwards]
    if plan:
        executor.migrate([(m.app_label, m.name) for m, _ in plan], plan=plan)


def executor_from(applied):
    """A migration executor whose loader takes `applied`, the (app, name) of the recorded migrations (read by
    the caller with other reads), as recorded, reading nothing itself; None when a squashed migration is on
    disk (what is applied then depends on more than the recorded rows)."""
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(None)  # the graph from disk alone
    if executor.loader.replacements:
        return None
    executor.loader.applied_migrations = dict.fromkeys(applied)
    return executor


def plain_migrate_waiting_from(applied):
    """plain_migrate_waiting() from `applied` (as for executor_from); None with a squashed migration on disk."""
    executor = executor_from(applied)
    return None if executor is None else plain_migrate_waiting(executor=executor)


def plain_migrate_waiting(using="default", executor=None):
    """["app.name", ...] of the migrations a plain `migrate` would apply now (operator steps left out)."""
    executor = executor or LockRetryingExecutor(connections[using])
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    waiting = _without(plan, [(migration, backwards) for migration, backwards in plan if step_of(migration, backwards)])
    return [f"{migration.app_label}.{migration.name}" for migration, _ in waiting]


def _require_plain_migrate_done(executor):
    """CommandError, before anything changes, while a plain `migrate` has work left: the operator steps
    run on a schema whose harmless migrations (the project's bookkeeping among them) are applied."""
    waiting = plain_migrate_waiting(executor=executor)
    if waiting:
        names = ", ".join(waiting)
        raise CommandError(f"`manage.py migrate` has migrations to apply first ({names}): run it, then this step "
                           "again. Nothing was changed.")


def migrate_to(target, using="default", fake=False, out=None, app=APP):
    """`migrate <app> <target>` with Django's own executor, operator steps included (None: zero),
    its concurrent builds reporting to `out`: for the demo and the tests, which set up a table at a
    given phase."""
    executor = LockRetryingExecutor(connections[using])
    plan = executor.migration_plan([(app, target)])
    report_builds_to(plan, out)
    executor.migrate([(app, target)], plan=plan, fake=fake)
