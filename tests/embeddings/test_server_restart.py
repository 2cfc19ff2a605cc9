"""The database going away mid-backfill: a server restart, and a lock held past every retry.

The restart uses a private PostgreSQL in a temporary directory (the shared one must stay up).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import closing
from pathlib import Path

import numpy as np
import psycopg2
import pytest
from django.db import connection, transaction

from segments.switch import backfill
from segments.switch.backfill import BackfillError, run_backfill
from embeddings.fakes import HashingEncoder
from segments.models import BackfillClaim
from tests.conftest import ROOT
from tests.embeddings.conftest import FAKE_BACKFILL, add_segments, sentences
from tests.embeddings.encoders import RecordingEncoder
from tests.embeddings.test_backfill import assert_every_vector_is_its_texts

DATABASE = "backfill_restart"


class PrivateServer:
    """An embedded PostgreSQL of this test's own, which it may stop and start at will."""

    def __init__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver import _commands
        self.pg_ctl = _commands.pg_ctl
        self.directory = Path(tempfile.mkdtemp(prefix="bf-restart-"))
        self.server = pgserver.get_server(self.directory / "pgdata", cleanup_mode=None)
        self.socket_dir = str(self.server.get_postmaster_info().socket_dir)
        self.url = f"postgresql://postgres@/{DATABASE}?host={self.socket_dir}"

    def connect(self, dbname=DATABASE):
        """An autocommit connection (use it with contextlib.closing)."""
        conn = psycopg2.connect(host=self.socket_dir, dbname=dbname, user="postgres")
        conn.autocommit = True
        return conn

    def stop(self):
        self.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self):
        with self.server._lock:
            self.server.ensure_postgres_running()

    def remove(self):
        try:
            self.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_server():
    server = PrivateServer()
    try:
        with closing(server.connect("postgres")) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        env = {**os.environ, "DATABASE_URL": server.url}
        subprocess.run([sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], env=env, cwd=ROOT, check=True,
                       capture_output=True, timeout=300)
        yield server
    finally:
        server.remove()


def query(server, sql, params=None):
    with closing(server.connect()) as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("write_ahead", ["", "1"], ids=["sent-with-its-batch", "sent-ahead"])
def test_the_backfill_rides_out_a_server_restart(private_server, write_ahead):
    texts = sentences(3000, seed=8)
    with closing(private_server.connect()) as conn, conn.cursor() as cursor:
        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) "
                       "SELECT 'v', n, n + 1, t FROM unnest(%s::text[]) WITH ORDINALITY u(t, n)", [texts])
    env = {**os.environ, "DATABASE_URL": private_server.url, "FAKE_ENCODER_DELAY": "0.01",
           "FAKE_BACKFILL_WRITE_AHEAD": write_ahead}
    process = subprocess.Popen([sys.executable, str(FAKE_BACKFILL), "--batch-size", "20", "--json"], env=env,
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    embedded = "SELECT count(*) FROM segments WHERE embedding_384 IS NOT NULL"  # the expanded phase, as in production
    while process.poll() is None and query(private_server, embedded)[0][0] == 0:
        time.sleep(0.02)
    private_server.stop()
    time.sleep(1.5)
    private_server.start()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "retrying" in err  # it did meet the outage
    report = json.loads(out)
    assert (report["rows_embedded"], report["rows_remaining"]) == (3000, 0)
    stored = query(private_server, "SELECT text, embedding_384::real[] FROM segments")
    expected = HashingEncoder().encode_documents([text for text, _ in stored])
    if query(private_server, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                             "attrelid = 'segments'::regclass AND attname = 'embedding_384'")[0][0].startswith("halfvec"):
        expected = expected.astype(np.float16).astype(np.float32)  # exactly as a halfvec holds them
    assert np.array_equal(np.array([vector for _, vector in stored], dtype=np.float32), expected)
    assert query(private_server, "SELECT count(*) FROM embeddings_backfill_claim")[0][0] == 0


def hold_row_lock(segment_id, seconds, locked):
    """Lock one segment in a transaction of another session for `seconds`, as a slow application would."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT id FROM segments WHERE id = %s FOR UPDATE", [segment_id])
            locked.set()
            time.sleep(seconds)
    finally:
        connection.close()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(backfill, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(backfill, "DB_ATTEMPTS", 3)
    monkeypatch.setattr(backfill, "BACKOFF_FIRST_SECONDS", 0.05)


@pytest.mark.django_db(transaction=True)
def test_a_lock_timeout_is_retried_until_the_lock_is_released(quick_retries, caplog):
    ids = add_segments(sentences(40))
    locked = threading.Event()
    holder = threading.Thread(target=hold_row_lock, args=(ids[25], 0.4, locked))
    holder.start()
    locked.wait(10)
    report = run_backfill(RecordingEncoder(), batch_size=10)
    holder.join()
    assert (report.rows_embedded, report.rows_remaining) == (40, 0)
    assert any("lock timeout" in record.getMessage() for record in caplog.records)
    assert_every_vector_is_its_texts()


@pytest.mark.django_db(transaction=True)
def test_a_lock_held_past_every_retry_stops_with_a_clear_error_and_the_next_run_finishes(quick_retries):
    ids = add_segments(sentences(40))
    locked = threading.Event()
    holder = threading.Thread(target=hold_row_lock, args=(ids[25], 3, locked))
    holder.start()
    locked.wait(10)
    with pytest.raises(BackfillError, match=r"kept failing \(3 attempts by the backfill writer\): "
                                            r"canceling statement due to lock timeout.*"
                                            r"run `manage.py backfill_embeddings` again") as error:
        run_backfill(RecordingEncoder(), batch_size=10)
    holder.join()
    assert 0 < error.value.report.rows_embedded < 40
    assert BackfillClaim.objects.count() == 0  # its claims were released on the way out
    assert run_backfill(RecordingEncoder(), batch_size=10).rows_remaining == 0
    assert_every_vector_is_its_texts()
