"""No migration of the project, and no operator step, holds the application's writes in the lock queue.

Each is applied while an application transaction holds a row lock on `segments` (as a slow request
does) and the application goes on inserting, 20 times a second: no insert waits longer than
WRITE_WAIT_BOUND (a step that needs a stronger lock tries for it in short attempts, giving the writes
way between them), and each step completes once the transaction ends.

The migrations are read from the migration graph, in the order a deploy applies them: a migration
added later is covered without editing this file, and so are the five that `makeswitch` writes for
the next switch.
"""
import threading
import time
from contextlib import contextmanager

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.loader import MigrationLoader

from embeddings.fakes import HashingEncoder
from segments.switch import gate, legacy_index, steps
from segments.switch.backfill import run_backfill
from segments.switch.backfill.session import open_connection
from tests.embeddings.conftest import add_segments, sentences

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

WRITE_WAIT_BOUND = 1.0  # seconds: the longest an application insert may wait behind a step
HOLD_SECONDS = 1.2  # how long the application's transaction keeps its row lock: beyond a step's first attempts


class Inserts(threading.Thread):
    """The application: an insert every 50 ms, each its own transaction; the slowest one."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.slowest, self.count, self.errors = threading.Event(), 0.0, 0, []

    def run(self):
        conn = open_connection("default", "app")
        conn.autocommit = True
        try:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    with conn.cursor() as cursor:
                        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) "
                                       "VALUES ('app', 0, 1, ' ')")  # blank: nothing for the switch to embed
                    self.count += 1
                except Exception as exc:  # every failure is a finding
                    self.errors.append(repr(exc))
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.stop.wait(0.05)
        finally:
            conn.close()


@contextmanager
def a_row_locked_while_the_application_inserts():
    """An application transaction holding a row lock on segments for HOLD_SECONDS, inserts going on
    throughout; yields the Inserts (its `slowest` is read after the block)."""
    holder = open_connection("default", "app")
    with holder.cursor() as cursor:
        cursor.execute("UPDATE segments SET speaker_label = speaker_label WHERE id = (SELECT min(id) FROM segments)")
    release = threading.Timer(HOLD_SECONDS, holder.commit)
    inserts = Inserts()
    inserts.start()
    time.sleep(0.2)
    release.start()
    try:
        yield inserts
    finally:
        release.join()
        time.sleep(0.2)
        inserts.stop.set()
        inserts.join(10)
        holder.close()


def assert_never_queued(step, apply):
    """`apply()` under a held row lock and live inserts: it completes, and no insert waited long."""
    with a_row_locked_while_the_application_inserts() as inserts:
        apply()
    assert inserts.errors == [], f"{step}: {inserts.errors[:3]}"
    assert inserts.slowest <= WRITE_WAIT_BOUND, f"{step} held the application's inserts {inserts.slowest:.2f} s"
    assert inserts.count >= 10  # the application kept writing throughout


def project_plan():
    """[(app, migration)] of the project's apps up to the segments app's last migration, in the order
    `migrate` applies them, with the Migration of each."""
    loader = MigrationLoader(connection, ignore_no_migrations=True)
    leaf = loader.graph.leaf_nodes("segments")[0]
    return [(key, loader.graph.nodes[key]) for key in loader.graph.forwards_plan(leaf)]


def applied(app, name):
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = %s AND name = %s", [app, name])
        return cursor.fetchone()[0] == 1


def test_no_migration_of_the_project_holds_the_application_in_the_lock_queue(segments_at):
    segments_at("legacy")
    add_segments(sentences(50))
    plan = project_plan()
    after_the_table = plan[plan.index(next(item for item in plan if item[0] == ("segments", "0001_initial"))) + 1:]
    assert len(after_the_table) >= 12
    for (app, name), migration in after_the_table:
        if getattr(migration, "operator_step", None) == "swap":
            run_backfill(HashingEncoder(384))  # the swap takes a filled column
        assert_never_queued(f"{app}.{name}", lambda: gate.migrate_to(name, app=app))
        assert applied(app, name), f"{app}.{name}"


def test_no_migration_makeswitch_writes_holds_the_application_in_the_lock_queue(segments_at, migrations_copy, settings):
    segments_at("final")
    add_segments(sentences(50))
    run_backfill(HashingEncoder(384))
    settings.EMBEDDING_MODEL, settings.EMBEDDING_DIMENSIONS, settings.EMBEDDING_STORAGE = "hashing-768", 768, "vector"
    settings.LEGACY_EMBEDDING_MODEL = "hashing-384"
    call_command("makeswitch", verbosity=0)
    written = [name for (app, name), _ in project_plan() if "_switch_2_" in name]
    assert [name.split("_switch_2_")[1] for name in written] == ["expand", "pending_index", "index", "swap", "contract"]
    for name in written:
        assert_never_queued(name, lambda: gate.migrate_to(name))
        assert applied("segments", name), name
        if name.endswith("_expand"):
            run_backfill(HashingEncoder(768))


def at_the_swap(segments_at):
    """The expanded phase (with the legacy L2 index of the original table), every segment embedded."""
    segments_at("expanded")
    add_segments(sentences(50))
    run_backfill(HashingEncoder(384))


OPERATOR_STEPS = {
    # step: (what it needs done first, the step)
    "drop-legacy-index": (lambda: None, lambda: legacy_index.drop_step(confirmed=True)),
    "rebuild-legacy-index": (lambda: legacy_index.drop_step(confirmed=True), lambda: legacy_index.rebuild_step()),
    "index": (lambda: None, lambda: steps.index()),
    "swap": (lambda: steps.index(), lambda: steps.swap(encoder=HashingEncoder(384))),
    "undo": (lambda: (steps.index(), steps.swap(encoder=HashingEncoder(384))), lambda: steps.undo()),
    "contract": (lambda: (steps.index(), steps.swap(encoder=HashingEncoder(384))),
                 lambda: steps.contract(confirmed=True)),
}


@pytest.mark.parametrize("step", list(OPERATOR_STEPS))
def test_no_operator_step_holds_the_application_in_the_lock_queue(segments_at, step):
    at_the_swap(segments_at)
    before, run = OPERATOR_STEPS[step]
    before()
    result = []
    assert_never_queued(step, lambda: result.append(run()))
    assert result and result[0].done, result

