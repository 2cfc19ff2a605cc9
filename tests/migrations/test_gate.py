"""A plain `manage.py migrate` is safe at any moment: it never runs an operator step."""
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from embeddings.fakes import HashingEncoder
from segments.schema import embedding_schema
from segments.switch.backfill import run_backfill
from tests.embeddings.conftest import add_segments, sentences


def applied():
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM django_migrations WHERE app = 'segments' ORDER BY name")
        return [row[0] for row in cursor.fetchall()]


def migrate(*args, **options):
    out = StringIO()
    call_command("migrate", *args, stdout=out, **options)
    return out.getvalue()


def test_plain_migrate_expands_and_stops_before_the_index_even_when_the_backfill_is_complete(segments_at):
    segments_at("legacy")
    add_segments(sentences(20))

    out = migrate()
    assert embedding_schema().phase == "expanded"
    assert applied()[-1] == "0011_worker_link_and_pause"
    assert "0006_embedding_384_hnsw" not in applied()
    assert "phase: expanded" in out and "next:" in out

    run_backfill(HashingEncoder())
    migrate()
    assert applied()[-1] == "0011_worker_link_and_pause"  # no index, no swap, no drop
    assert not {"0006_embedding_384_hnsw", "0007_swap_embedding", "0008_drop_embedding_legacy"} & set(applied())


def test_plain_migrate_after_the_swap_leaves_the_legacy_column(segments_at):
    segments_at("swapped")
    migrate()
    schema = embedding_schema()
    assert (schema.phase, schema.legacy_column) == ("swapped", "embedding_legacy")
    assert "0008_drop_embedding_legacy" not in applied()


@pytest.mark.parametrize("phase, target, step", [
    ("expanded", "0006", "embedding_switch index"),
    ("indexed", "0007", "embedding_switch swap"),
    ("swapped", "0008", "embedding_switch contract"),
    ("swapped", "0006", "embedding_switch undo"),
])
def test_an_explicit_target_that_needs_an_operator_step_is_refused_unchanged(segments_at, schema_dump, phase,
                                                                              target, step):
    segments_at(phase)
    before = schema_dump(), applied()

    with pytest.raises(CommandError, match=rf"operator step.*`manage.py {step}`.*Nothing was changed"):
        migrate("segments", target)

    assert (schema_dump(), applied()) == before


def test_migrate_check_and_plan_leave_the_operator_steps_out(segments_at):
    segments_at("expanded")
    migrate(check_unapplied=True)  # exit 0: nothing a deploy should apply (SystemExit(1) otherwise)
    assert "0006_embedding_384_hnsw" not in migrate(plan=True)


def test_the_contract_records_the_migrations_that_waited_for_it_in_its_drops_one_message(segments_at):
    from segments.switch import gate, steps

    segments_at("swapped")
    sent = []

    def record(execute, sql, params, many, context):
        sent.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        steps.contract(confirmed=True)
    [drop] = [sql for sql in sent if "DROP COLUMN" in sql]
    for name in ("0008_drop_embedding_legacy", "0010_first_switch_done", "0012_first_switch_joined"):
        assert name in drop and name in applied()
    assert not [sql for sql in sent if sql.strip().upper().startswith("INSERT INTO \"DJANGO_MIGRATIONS\"")]
    assert gate.plain_migrate_waiting() == []


def test_only_migrations_with_nothing_to_run_are_recorded_in_a_steps_message():
    from django.db.migrations.loader import MigrationLoader

    from segments.switch import gate

    loader = MigrationLoader(None, ignore_no_migrations=True)
    migration = lambda name: loader.get_migration("segments", name)  # noqa: E731
    assert gate._records_only(migration("0010_first_switch_done"))  # state only
    assert gate._records_only(migration("0012_first_switch_joined"))  # no operation
    assert not gate._records_only(migration("0009_embedding_on_arrival"))
    assert not gate._records_only(migration("0011_worker_link_and_pause"))
