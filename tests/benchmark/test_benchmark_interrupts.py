"""The benchmark's scratch schema never outlives its run: removed on SIGTERM and Ctrl-C (also
mid-statement), and a schema left by a killed run (SIGKILL) is removed by the next run, while
the schema of a run still going is left alone."""
import json
import signal
import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from benchmark.scratch import drop_leftovers, scratch_schemas, session_schema_name
from tests.conftest import manage

pytestmark = pytest.mark.django_db(transaction=True)

WAIT_SECONDS = 120


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def scratch_table_exists(name):
    def check():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_tables WHERE schemaname ~ '^benchmark_' AND tablename = %s", [name])
            return cursor.fetchone() is not None
    return check


def hnsw_build_running():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_progress_create_index p JOIN pg_class c ON c.oid = p.relid "
                       "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname ~ '^benchmark_'")
        return cursor.fetchone() is not None


def session_alive(schema):
    pid = int(schema.split("_")[1])
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone() is not None


@pytest.mark.slow
@pytest.mark.parametrize("signum, returncode, message", [
    (signal.SIGTERM, 143, "Interrupted by SIGTERM"),
    (signal.SIGINT, 130, "Interrupted;"),
])
def test_an_interrupted_run_removes_its_scratch_schema(signum, returncode, message):
    # A shell that runs jobs in the background starts them with SIGINT ignored, and Python then
    # never turns Ctrl-C into KeyboardInterrupt: give the run the default a terminal gives it.
    process = manage("embedding_benchmark", "--suite", "db-write", "--rows", "6000", "--json",
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(scratch_table_exists("write_per_row_update"), "the run to be writing")
    process.send_signal(signum)
    out, err = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == returncode, err
    assert message in err and out == ""
    assert scratch_schemas() == []


@pytest.mark.slow
def test_sigterm_during_the_index_build_cancels_it_and_removes_the_scratch_schema():
    process = manage("embedding_benchmark", "--suite", "search", "--rows", "15000", "--json")
    wait_for(hnsw_build_running, "the HNSW build")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == 143, err
    assert "Interrupted by SIGTERM" in err
    assert scratch_schemas() == [] and not hnsw_build_running()


@pytest.mark.slow
def test_the_schema_of_a_killed_run_is_removed_by_the_next_run():
    # A shell that runs jobs in the background starts them with SIGINT ignored, and Python then
    # never turns Ctrl-C into KeyboardInterrupt: give the run the default a terminal gives it.
    process = manage("embedding_benchmark", "--suite", "db-write", "--rows", "6000", "--json",
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(scratch_table_exists("write_per_row_update"), "the run to be writing")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=WAIT_SECONDS)
    [leftover] = scratch_schemas()
    wait_for(lambda: not session_alive(leftover), "the killed run's database session to end")

    out = StringIO()
    call_command("embedding_benchmark", "--suite", "db-write", "--rows", "10", "--json", stdout=out, stderr=StringIO())

    assert json.loads(out.getvalue())["run"]["scratch_leftovers_dropped"] == [leftover]
    assert scratch_schemas() == []


def test_leftovers_are_the_schemas_whose_session_is_gone_and_only_those():
    with connection.cursor() as cursor:
        live_run = session_schema_name(cursor)  # this session is alive: as a run still going
        cursor.execute(f'CREATE SCHEMA "{live_run}"; CREATE SCHEMA benchmark_999999_1; '
                       "CREATE TABLE benchmark_999999_1.segments (id int); CREATE SCHEMA benchmark_notes")
    try:
        assert drop_leftovers() == ["benchmark_999999_1"]
        assert scratch_schemas() == [live_run]
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP SCHEMA "{live_run}"; DROP SCHEMA benchmark_notes')
