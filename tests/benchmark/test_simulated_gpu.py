"""The benchmark's simulated GPU: a fixed rate by sleeping (not by using the CPU), unit vectors,
and only ever handed to the engine on connections that reach the run's scratch schema: the scratch
copy is what gets written, never the live table."""
import time

import numpy as np
import pytest
from django.db import connection

from benchmark import backfill
from benchmark.encoders import SimulatedGpuEncoder
from benchmark.runner import Context, Options
from benchmark.scratch import scratch_schema, scratch_schemas
from benchmark.source import vector_column
from embeddings.ledger import LEDGER
from segments.schema import BLANK_TEXT_PATTERN
from segments.switch.backfill import Tuning, run_backfill
from tests.embeddings.conftest import add_segments, sentences, stored_vectors

TEXTS = [f"segment {i} about ketosis" for i in range(2000)]


def test_it_takes_the_time_of_its_rate_sleeping_not_computing():
    encoder = SimulatedGpuEncoder(texts_per_second=10_000)
    wall, cpu = time.perf_counter(), time.process_time()
    vectors = encoder.encode_documents(TEXTS)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.2  # 2,000 texts at 10,000 texts/s
    assert cpu < wall / 2
    assert vectors.shape == (2000, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_calls_queue_behind_each_other_as_on_one_device():
    encoder = SimulatedGpuEncoder(texts_per_second=10_000)
    started = time.perf_counter()
    for _ in range(4):
        encoder.encode_documents(TEXTS[:500])
    assert time.perf_counter() - started >= 0.2


def test_the_same_text_gets_the_same_vector():
    first, second, _ = SimulatedGpuEncoder(dimensions=8).encode_documents(["steak", "steak", "eggs"])
    assert np.array_equal(first, second)


def ledger_rows(table=f"public.{LEDGER}"):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT table_schema, table_name, column_name, description FROM {table} ORDER BY id")
        return cursor.fetchall()


@pytest.mark.django_db(transaction=True)
def test_the_backfill_suite_writes_its_simulated_vectors_into_the_scratch_copy_and_nowhere_else():
    add_segments(sentences(20, seed=21))  # pending in the live table
    live_before, ledger_before = stored_vectors(), ledger_rows()
    with scratch_schema() as scratch:
        ctx = Context(Options(rows=60), scratch, None, "cpu", vector_column(), progress=lambda message: None)
        table = backfill.prepare_tables(ctx, 60)
        report, _ = backfill.backfill(ctx, SimulatedGpuEncoder(texts_per_second=100_000), None, Tuning())
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*), count({ctx.column.name}) FROM {table} WHERE text !~ %s",
                           [BLANK_TEXT_PATTERN])
            with_text, embedded = cursor.fetchone()
        recorded = ledger_rows(scratch.table(LEDGER))

    assert embedded == with_text == report.rows_embedded > 20 and report.rows_remaining == 0
    assert recorded == [(scratch.schema, "segments", ctx.column.name, "simulated GPU, vectors mean nothing")]
    assert stored_vectors() == live_before and all(vector is None for vector in live_before.values())
    assert ledger_rows() == ledger_before  # the model was recorded in the scratch schema's own ledger
    assert scratch_schemas() == []


@pytest.mark.django_db(transaction=True)
def test_the_engine_gets_no_connection_where_a_table_would_resolve_outside_the_scratch_schema():
    add_segments(sentences(5, seed=15))
    with scratch_schema() as scratch:
        # No scratch copies yet: through the search_path, `segments` would be the live table.
        with pytest.raises(backfill.NotScratch, match="segments in public.*Nothing was read or written"):
            backfill.connector(scratch)("writer")
        with pytest.raises(backfill.NotScratch):
            run_backfill(SimulatedGpuEncoder(), connect=backfill.connector(scratch))
    assert all(vector is None for vector in stored_vectors().values())
    assert scratch_schemas() == []
