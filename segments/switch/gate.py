"""Which migrations a plain `manage.py migrate` may run: the gate in front of the operator steps.

A deploy runs `manage.py migrate` at any moment. It must only ever do what is quick and
harmless: the expand phase, the project's own tables, other apps. The steps that are slow, that
change what the application searches, or that destroy data (building the vector index, the
swap and its undo, the contract) are marked on their migration with `operator_step` and run
only inside `allow(step)`, which the operator's command (`manage.py embedding_switch STEP`)
opens. Outside it:

- a plain `migrate` (or `migrate segments`) leaves them out of its plan, and whatever depends
  on them, and exits 0;
- an explicit target that needs one (`migrate segments 0007`, or back past one) is refused
  with the command to run instead, before anything changes.
"""
from contextlib import contextmanager
from contextvars import ContextVar

from django.core.management.base import CommandError
from django.db.migrations.executor import MigrationExecutor

STEPS = {
    # step: (what it is, the command that runs it)
    "index": ("the HNSW index build", "manage.py embedding_switch index"),
    "swap": ("the swap", "manage.py embedding_switch swap"),
    "undo": ("the undo of the swap", "manage.py embedding_switch undo"),
    "contract": ("the contract (drops the legacy column for good)", "manage.py embedding_switch contract"),
}

_allowed = ContextVar("operator_steps_allowed", default=frozenset())


@contextmanager
def allow(*steps):
    """Let migrations of these operator steps run in this block (the operator asked for them)."""
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown operator step(s): {', '.join(sorted(unknown))}")
    token = _allowed.set(_allowed.get() | frozenset(steps))
    try:
        yield
    finally:
        _allowed.reset(token)


def step_of(migration, backwards):
    """The operator step applying (or, `backwards`, unapplying) `migration` is; None if none."""
    step = getattr(migration, "operator_step", None)
    if step is None:
        return None
    if backwards:
        return getattr(migration, "undo_step", step)
    return step


def is_allowed(migration, backwards):
    step = step_of(migration, backwards)
    return step is None or step in _allowed.get()


class GatedMigrationExecutor(MigrationExecutor):
    """A MigrationExecutor whose plans leave out (plain migrate) or refuse (explicit targets)
    the operator steps not allowed here."""

    explicit_target = False  # set by the migrate command: the operator named a migration

    def migration_plan(self, targets, clean_start=False):
        plan = super().migration_plan(targets, clean_start)
        if clean_start:
            return plan  # the full plan Django renders states from, not what it applies
        blocked = [(migration, backwards) for migration, backwards in plan if not is_allowed(migration, backwards)]
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
        if applied or (migration.app_label, migration.name) != ("segments", "0001_initial"):
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
