"""Helpers for the backfill's tests: rows in, vectors out, and the command run both ways."""
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

from tests.conftest import ROOT, database_url

FAKE_BACKFILL = Path(__file__).resolve().parent / "fake_backfill.py"


def add_segments(texts, video_id="video"):
    """Insert segments with `texts` through plain SQL (as the application does); their ids."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO segments (video_id, start_sec, end_sec, text) "
            "SELECT %s, n, n + 1, t FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n RETURNING id",
            [video_id, list(texts)],
        )
        return sorted(row[0] for row in cursor.fetchall())


def segment_texts():
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM segments ORDER BY id")
        return dict(cursor.fetchall())


def vector_column():
    """The column holding the new model's vectors at the table's phase (embedding_384 before the swap)."""
    from segments.schema import embedding_schema

    return embedding_schema().vector_column


def stored_vectors(column=None):
    """{id: float32 vector, or None} of every segment (in the new model's column by default)."""
    column = column or vector_column()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id, {column}::real[] FROM segments ORDER BY id")
        return {i: None if v is None else np.array(v, dtype=np.float32) for i, v in cursor.fetchall()}


def is_blank_in_postgres(text):
    """Whether PostgreSQL's `[[:space:]]` regex (the backfill's definition) calls `text` blank."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s ~ '^[[:space:]]*$'", [text])
        return cursor.fetchone()[0]


def scalar(sql, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def sentences(count, seed=0, words=12):
    """`count` distinct English-like sentences."""
    vocabulary = ("meat fat protein carnivore diet insulin ketones steak eggs butter salt liver fasting "
                  "inflammation sugar plants fiber cholesterol energy sleep muscle bone heart study").split()
    rng = np.random.default_rng(seed)
    return [f"{i}: " + " ".join(rng.choice(vocabulary, size=words)) for i in range(count)]


def command(*args, **options):
    """call_command, returning (stdout, stderr)."""
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def fake_backfill(*args, env=None, **popen):
    """Start `backfill_embeddings *args` with the HashingEncoder, in a subprocess on the test database.

    FAKE_ENCODER_DELAY in `env` makes each encode call sleep that many seconds.
    """
    full_env = {**os.environ, "DATABASE_URL": database_url(), **(env or {})}
    return subprocess.Popen([sys.executable, str(FAKE_BACKFILL), *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture
def expanded(segments_at):
    """The table in the expanded phase, where production backfills (embedding_384 beside the legacy
    column, its partial index and trigger); the final phase is restored afterwards."""
    segments_at("expanded")


@pytest.fixture
def write_log(transactional_db):
    """A table recording every write of a new vector: (segment id, session pid)."""
    column = vector_column()
    with connection.cursor() as cursor:
        cursor.execute(f"""
            CREATE TABLE test_write_log (segment_id int, pid int);
            CREATE FUNCTION test_log_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO test_write_log VALUES (NEW.id, pg_backend_pid()); RETURN NEW; END $$;
            CREATE TRIGGER test_log_write AFTER UPDATE OF {column} ON segments
                FOR EACH ROW WHEN (NEW.{column} IS NOT NULL) EXECUTE FUNCTION test_log_write();
            -- ALWAYS: it must fire on the backfill's writes too, which keep ordinary triggers quiet.
            ALTER TABLE segments ENABLE ALWAYS TRIGGER test_log_write;
        """)
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER test_log_write ON segments; DROP FUNCTION test_log_write(); "
                       "DROP TABLE test_write_log;")


def swapped_with_legacy_vectors(count):
    """`count` segments, each with a legacy 1536-dim vector and the new model's (HashingEncoder), the
    HNSW index built and the swap done: the table as the contract finds it. Needs segments_at("expanded")."""
    from embeddings.fakes import HashingEncoder
    from segments.switch import steps
    from segments.switch.backfill import run_backfill

    add_segments(sentences(count))
    with connection.cursor() as cursor:
        cursor.execute("UPDATE segments SET embedding = ('[' || array_to_string(array_fill(0.5::real, "
                       "ARRAY[1536]), ',') || ']')::vector")
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
