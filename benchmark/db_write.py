"""The db-write suite: writing 384-dim vectors into copies of `segments`, several ways.

On the scratch copy (shapes.py: btree indexes, no vector index), three methods:
1. one `UPDATE ... WHERE id = %s` per row, the vector sent as a text literal (the old project's
   way), all in one transaction;
2. the ORM's `bulk_update` (batches of BULK_UPDATE_BATCH rows);
3. the backfill's write path, embeddings.writer.VectorWriter (binary COPY into a staging table,
   one UPDATE ... FROM per batch of the engine's batch size), one session. Like every writer of
   vectors it checks the column's model in the model ledger, batch by batch: the scratch schema's
   ledger (its session's search_path starts there meanwhile), where its vectors are declared as
   RANDOM_VECTORS (`identity`); the ledger is emptied with each table dropped.

The production case: the backfill's write path again on a live-shaped copy (the legacy column
filled, its IVFFlat index as the original project built it), and on the same with the legacy
index dropped (the operator's `embedding_switch drop-legacy-index`).

The physical reference: one binary COPY of the same vectors into an empty table without
indexes, the least the server can do to take them in; every write figure is also given as a
fraction of it.

Each method starts from a fresh copy of the same rows and writes the same vectors. Only the
writes are timed: ids and text md5s are read beforehand. The two slow methods write a sample of
the rows (SLOW_METHOD_ROWS at most); their rate is what the comparison needs.
"""
import io

import numpy as np
from django.apps.registry import Apps
from django.db import connections, models, transaction
from pgvector.django import VectorField

from benchmark.measure import per_second, timed
from benchmark.scratch import quote, search_path_of
from benchmark.shapes import DESCRIPTIONS, settle
from benchmark.source import segments_copy
from embeddings import ledger
from embeddings.writer import copy_payload
from segments.switch.backfill import DEFAULT_BATCH_SIZE as BACKFILL_BATCH

SLOW_METHOD_ROWS = 3_000
BULK_UPDATE_BATCH = 1_000
# The targets for the backfill path.
TARGET_ROWS_PER_S = 20_000
TARGET_RATIO_TO_PER_ROW = 10
# What the model ledger records as the model of the vectors the suite writes (no model made them).
RANDOM_VECTORS = "db-write suite: random unit vectors"


def identity(dims):
    """The ledger identity of the suite's vectors: declared by name (they have no fingerprint)."""
    return ledger.ModelIdentity(RANDOM_VECTORS, int(dims), description="random unit vectors, not a model's")


def unit_vectors(count, dims, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((count, dims), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def vector_literal(vector):
    return "[" + ",".join(str(value) for value in vector.tolist()) + "]"


def per_row_update(using, table, column, ids, md5s, vectors):
    """The old way: one UPDATE per row, vectors formatted as text."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        for segment_id, vector in zip(ids, vectors):
            cursor.execute(f"UPDATE {table} SET {quote(column)} = %s::vector WHERE id = %s",
                           [vector_literal(vector), segment_id])


def scratch_model(table, column, dims):
    """An unmanaged model over scratch `table`, in a registry of its own (the app's is untouched)."""
    meta = type("Meta", (), {"app_label": "embeddings", "db_table": table, "managed": False, "apps": Apps()})
    return type("BenchmarkSegment", (models.Model,), {
        "__module__": __name__, "Meta": meta,
        "id": models.IntegerField(primary_key=True),
        column: VectorField(dimensions=dims, null=True),
    })


def orm_bulk_update(using, table, column, ids, md5s, vectors):
    """The ORM's bulk_update, as an application would write it."""
    model = scratch_model(table, column, vectors.shape[1])
    objects = [model(id=segment_id, **{column: vector}) for segment_id, vector in zip(ids, vectors)]
    with transaction.atomic(using=using):
        model.objects.using(using).bulk_update(objects, [column], batch_size=BULK_UPDATE_BATCH)


def backfill_path(using, table, column, ids, md5s, vectors):
    """The backfill's path: VectorWriter, one transaction per batch."""
    from embeddings.writer import VectorWriter

    writer = VectorWriter(connections[using], quote(column), vectors.shape[1], table=table,
                          identity=identity(vectors.shape[1]))
    with search_path_of(using, table):  # the scratch schema's model ledger
        for start in range(0, len(ids), BACKFILL_BATCH):
            end = start + BACKFILL_BATCH
            with transaction.atomic(using=using):
                writer.write(ids[start:end], md5s[start:end], vectors[start:end])


METHODS = [
    ("per_row_update", "one UPDATE per row (vector as text)", per_row_update, True),
    ("bulk_update", f"ORM bulk_update (batch_size={BULK_UPDATE_BATCH})", orm_bulk_update, True),
    ("backfill_path", f"VectorWriter: binary COPY + UPDATE ... FROM ({BACKFILL_BATCH:,} rows/batch)", backfill_path,
     False),
]


def _rows_and_md5s(cursor, table, limit):
    cursor.execute(f"SELECT id, md5(text)::uuid FROM {table} ORDER BY id LIMIT %s", [limit])
    rows = cursor.fetchall()
    return [row[0] for row in rows], [row[1] for row in rows]


def _written(cursor, table, column):
    cursor.execute(f"SELECT count(*) FROM {table} WHERE {quote(column)} IS NOT NULL")
    return cursor.fetchone()[0]


def measure_method(ctx, name, method, rows, shape="scratch"):
    """Run `method` on a fresh copy of `shape` holding ctx.options.rows rows, writing `rows` of them."""
    scratch, using, column = ctx.scratch, ctx.options.using, ctx.column
    legacy = ctx.legacy_source() if shape != "scratch" else None
    # A live-shaped copy is `segments` in the scratch schema, with the staleness trigger as live.
    table_name = f"write_{name}" if shape == "scratch" else "segments"
    with connections[using].cursor() as cursor:
        table = segments_copy(cursor, scratch, ctx.source(), table_name, ctx.options.rows, column, shape, legacy)
        ids, md5s = _rows_and_md5s(cursor, table, rows)
    vectors = unit_vectors(len(ids), column.dimensions, ctx.options.seed)
    seconds, _ = timed(lambda: method(using, table, column.name, ids, md5s, vectors))
    with connections[using].cursor() as cursor:
        written = _written(cursor, table, column.name)
        scratch.forget_models(cursor)
        cursor.execute(f"DROP TABLE {table}")
    return {"table": DESCRIPTIONS[shape], "rows": len(ids), "rows_written": written, "seconds": seconds,
            "rows_per_s": per_second(written, seconds)}


def raw_copy(ctx):
    """The physical reference: one binary COPY of `rows` vectors (with ids and md5s, as the write
    path stages them) into an empty table without indexes, in one transaction."""
    using, dims, rows = ctx.options.using, ctx.column.dimensions, ctx.options.rows
    table = ctx.scratch.table("write_raw_copy")
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT id, md5(text)::uuid FROM {ctx.source().table} ORDER BY id LIMIT %s", [rows])
        ids, md5s = (list(column) for column in zip(*cursor.fetchall()))
        cursor.execute(f"CREATE TABLE {table} (id int4, text_md5 uuid, v vector({int(dims)}))")
        settle(cursor, table)
    vectors = unit_vectors(len(ids), dims, ctx.options.seed)

    def copy():
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            cursor.cursor.copy_expert(f"COPY {table} (id, text_md5, v) FROM STDIN WITH (FORMAT binary)",
                                      io.BytesIO(copy_payload(ids, md5s, vectors)))

    seconds, _ = timed(copy)
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        written = cursor.fetchone()[0]
        cursor.execute(f"DROP TABLE {table}")
    return {"method": "one binary COPY of the same vectors into an empty table (no index)", "table": "empty",
            "rows": len(ids), "rows_written": written, "seconds": seconds, "rows_per_s": per_second(written, seconds)}


# The backfill's write path on the live-shaped tables: (key, shape).
LIVE_SHAPES = [("live_backfill_path", "live"), ("live_without_legacy_index_backfill_path", "live_without_legacy_index")]


def run(ctx):
    """Measure the write methods, the production case and the raw COPY; returns the suite's figures."""
    total = ctx.options.rows
    figures = {"table_rows": total, "dimensions": ctx.column.dimensions, "rows_source": ctx.source().description}
    ctx.progress(f"db-write: the physical reference, one binary COPY of {total:,} vectors")
    figures["raw_copy"] = raw_copy(ctx)
    figures["raw_copy_rows_per_s"] = figures["raw_copy"]["rows_per_s"]
    for name, shape in LIVE_SHAPES:
        ctx.progress(f"db-write: the backfill path on a {DESCRIPTIONS[shape]}, {total:,} rows")
        figures[name] = {"method": METHODS[2][1], **measure_method(ctx, name, backfill_path, total, shape)}
        figures[f"{name}_rows_per_s"] = figures[name]["rows_per_s"]
    for name, description, method, slow in METHODS:
        rows = min(total, SLOW_METHOD_ROWS) if slow else total
        ctx.progress(f"db-write: {description}, {rows:,} rows")
        result = measure_method(ctx, name, method, rows)
        figures[name] = {"method": description, **result}
        figures[f"{name}_rows_per_s"] = result["rows_per_s"]
    fastest = figures["backfill_path_rows_per_s"]
    figures["backfill_path_vs_per_row_update"] = fastest / figures["per_row_update_rows_per_s"]
    figures["backfill_path_vs_bulk_update"] = fastest / figures["bulk_update_rows_per_s"]
    figures["live_legacy_index_cost"] = figures["live_without_legacy_index_backfill_path_rows_per_s"] / \
        figures["live_backfill_path_rows_per_s"]
    figures["share_of_raw_copy"] = {
        name: figures[f"{name}_rows_per_s"] / figures["raw_copy_rows_per_s"]
        for name in ("live_backfill_path", "live_without_legacy_index_backfill_path", "backfill_path",
                     "per_row_update", "bulk_update")
    }
    figures["targets"] = {
        f"backfill_path_at_least_{TARGET_ROWS_PER_S}_rows_per_s": fastest >= TARGET_ROWS_PER_S,
        f"backfill_path_at_least_{TARGET_RATIO_TO_PER_ROW}x_per_row_update":
            figures["backfill_path_vs_per_row_update"] >= TARGET_RATIO_TO_PER_ROW,
    }
    return figures
