"""The concurrent index builds wait for older transactions instead of giving up, say what they
wait for, and an interrupted build is dropped and rebuilt by the next run."""
import io
import logging
import threading
import time
from contextlib import contextmanager

import psycopg2
import pytest
from django.core.management.base import CommandError
from django.db import connection

from segments import demo_data
from askdrchaffee.postgres import index_valid
from segments.operations import WATCHER_NAME, watching
from tests.conftest import migrate_segments

HNSW = "segments_embedding_384_hnsw"


def connect():
    """A session of its own on the test database (another client of the server)."""
    params = connection.get_connection_params()
    return psycopg2.connect(host=params["host"], dbname=params["dbname"], user=params.get("user") or "postgres")


def fill(count):
    """`count` demo segments, each with a random 384-dim vector."""
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, count, seed=1, legacy_column="embedding")
        cursor.execute("UPDATE segments SET embedding_384 = "
                       "(SELECT array_agg(random()) FROM generate_series(1, 384) WHERE segments.id > 0)::vector")


class Holder(threading.Thread):
    """Another session that runs `statements` in a transaction and keeps it open for `seconds`
    (or until `release` is set), then commits."""

    def __init__(self, seconds, *statements, isolation=psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED):
        super().__init__(daemon=True)
        self.seconds, self.statements, self.isolation = seconds, statements, isolation
        self.pid = None
        self.holding, self.release, self.ended = threading.Event(), threading.Event(), threading.Event()

    def run(self):
        conn = connect()
        try:
            conn.set_session(isolation_level=self.isolation)
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                (self.pid,) = cursor.fetchone()
                conn.rollback()
                for statement in self.statements:
                    cursor.execute(statement)
            self.holding.set()
            self.release.wait(self.seconds)
            conn.commit()
        finally:
            conn.close()
            self.ended.set()


@contextmanager
def held(seconds, *statements, **kwargs):
    holder = Holder(seconds, *statements, **kwargs)
    holder.start()
    try:
        assert holder.holding.wait(10), "the other session did not start its transaction"
        yield holder
    finally:
        holder.release.set()
        holder.join()


def snapshot_held(seconds):
    """A REPEATABLE READ transaction (what pg_dump runs) that has taken its snapshot."""
    return held(seconds, "SELECT count(*) FROM segments", isolation=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)


def cancel_build_in_phase(phase, cancelled):
    """From another session: pg_cancel_backend() the index build once it reaches `phase`."""
    conn = connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            for _ in range(600):
                cursor.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_progress_create_index "
                               "WHERE phase = %s AND datname = current_database()", [phase])
                if cursor.fetchall():
                    cancelled.set()
                    return
                time.sleep(0.05)
    finally:
        conn.close()


def watcher_sessions(sql):
    return sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
               [WATCHER_NAME])[0][0]


def wait_for(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def validity(name):
    with connection.cursor() as cursor:
        return index_valid(cursor, name)


def test_an_older_snapshot_makes_the_hnsw_build_wait_and_name_it_despite_timeouts_then_succeed(
    segments_at, settings, sql, caplog
):
    settings.MIGRATION_LOCK_TIMEOUT = "300ms"
    segments_at("expanded")
    fill(200)
    out = io.StringIO()
    with snapshot_held(10) as holder:
        # What a role or server default could impose on the session; both shorter than the wait.
        sql("SET lock_timeout = '1s'; SET statement_timeout = '2s'")
        try:
            with caplog.at_level(logging.WARNING, logger="segments.operations"):
                migrate_segments("0006_embedding_384_hnsw", out=out.write)
            finished_after_snapshot = holder.ended.is_set()
            timeouts_after = sql("SELECT current_setting('lock_timeout'), current_setting('statement_timeout')")
        finally:
            sql("RESET lock_timeout; RESET statement_timeout")

    assert finished_after_snapshot
    assert validity(HNSW) is True
    assert timeouts_after == [("1s", "2s")]
    said = f"Building index {HNSW} is waiting, not failing (waiting for old snapshots"
    assert out.getvalue().count(f"pid {holder.pid} (") == 1
    assert said in out.getvalue()
    assert any(f"pid {holder.pid} (" in r.getMessage() and said in r.getMessage() for r in caplog.records)


def test_an_uncommitted_write_makes_the_todo_index_build_wait_and_name_it_then_succeed(segments_at, settings):
    settings.MIGRATION_LOCK_TIMEOUT = "300ms"
    segments_at("0003_embedding_384")
    fill(20)
    out = io.StringIO()
    write = "UPDATE segments SET speaker_label = speaker_label WHERE id = (SELECT min(id) FROM segments)"
    with held(4, write) as writer:
        migrate_segments("0004_embedding_384_todo_index", out=out.write)
        assert writer.ended.is_set()

    assert validity("segments_embedding_384_todo") is True
    assert f"pid {writer.pid} (idle in transaction" in out.getvalue()
    assert "waiting, not failing (waiting for writers before build" in out.getvalue()


def test_a_build_cancelled_while_waiting_leaves_an_invalid_index_that_the_next_run_rebuilds(segments_at, sql):
    segments_at("expanded")
    fill(200)
    cancelled = threading.Event()
    with snapshot_held(60):
        canceller = threading.Thread(target=cancel_build_in_phase, args=("waiting for old snapshots", cancelled))
        canceller.start()
        try:
            with pytest.raises(CommandError, match=f"Building index {HNSW} was cancelled"):
                migrate_segments("0006_embedding_384_hnsw")
        finally:
            canceller.join()
    assert cancelled.is_set()
    assert validity(HNSW) is False
    left_behind = sql("SELECT %s::regclass::oid", [HNSW])
    assert wait_for(lambda: watcher_sessions(sql) == 0)

    migrate_segments("0006_embedding_384_hnsw")
    assert validity(HNSW) is True
    assert sql("SELECT %s::regclass::oid", [HNSW]) != left_behind


@pytest.mark.django_db(transaction=True)
def test_the_watcher_stops_and_closes_its_connection_on_keyboard_interrupt(sql):
    with pytest.raises(KeyboardInterrupt):
        with watching("default", sql("SELECT pg_backend_pid()")[0][0], "Building index nothing", lambda *said: None):
            assert wait_for(lambda: watcher_sessions(sql) == 1)
            raise KeyboardInterrupt
    assert not [t for t in threading.enumerate() if t.name.startswith(WATCHER_NAME)]
    assert wait_for(lambda: watcher_sessions(sql) == 0)
