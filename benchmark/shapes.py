"""The tables the write suites measure, side by side, all in the run's scratch schema.

- `scratch`: the benchmark's scratch copy: the live table's columns and btree indexes (the
  pending-rows partial index among them once phase 1 is applied), no vector index, the legacy
  column empty. The backfill runs before the HNSW index exists, so this is its table where the
  operator has no legacy index.
- `live`: shaped like the live table in the expanded phase, as the original project left it:
  the legacy 1536-dim column filled (the live table's own vectors where it has them, simulated
  unit vectors otherwise), its IVFFlat `vector_l2_ops` index with lists=100 built as migration
  0001 builds it (on the empty table, then filled), the btree indexes, the pending-rows partial
  index and (in the backfill suite) the staleness trigger.
- `live_without_legacy_index`: the same after the operator's `embedding_switch
  drop-legacy-index` (filled without the index: the heap and the other indexes are the same).

Every table is vacuumed and analysed, then a CHECKPOINT (where the role may) starts each
measured run at the same point of the WAL cycle. The live tables are only read.
"""
import io

import numpy as np
from django.db import DatabaseError

from benchmark.scratch import quote
from embeddings.writer import copy_rows
from segments import demo_data
from segments.schema import LEGACY_DIMENSIONS, embedding_schema, pending_sql, vector_columns

SHAPES = ("scratch", "live", "live_without_legacy_index")
DESCRIPTIONS = {
    "scratch": "scratch copy: btree indexes, no vector index, legacy column empty",
    "live": "live-shaped: legacy 1536-dim column filled, its IVFFlat vector_l2_ops index (lists=100), "
            "btree indexes, pending-rows partial index",
    "live_without_legacy_index": "live-shaped, legacy IVFFlat index dropped (the operator's drop-legacy-index)",
}
LEGACY_LISTS = 100  # migration 0001's IVFFlat
COPY_CHUNK = 5_000


def legacy_column(using="default"):
    """(name, dimensions) of the legacy vectors' column in a live-shaped copy: the live table's
    legacy column, or `embedding_legacy` once the contract dropped it."""
    name = embedding_schema(using).legacy_column
    if name is None:
        return "embedding_legacy", LEGACY_DIMENSIONS
    return name, vector_columns(using).get(name) or LEGACY_DIMENSIONS


def _id_vector_payload(ids, vectors):
    """Binary COPY data for (id int4, v vector(dims))."""
    return copy_rows([(">i4", np.asarray(ids, dtype=np.int64))], np.asarray(vectors, dtype=np.float32))


def fill_legacy_source(cursor, scratch, source, seed=0, using="default"):
    """The scratch table `legacy_source` (id, v): a legacy vector for every row of `source`."""
    name, dims = legacy_column(using)
    table = scratch.table("legacy_source")
    cursor.execute(f"CREATE TABLE {table} (id int4 PRIMARY KEY, v vector({int(dims)}))")
    if embedding_schema(using).legacy_column:
        cursor.execute(f"INSERT INTO {table} SELECT s.id, l.{quote(name)} FROM {source.table} s "
                       f"JOIN public.segments l ON l.id = s.id WHERE l.{quote(name)} IS NOT NULL")
    cursor.execute(f"SELECT s.id FROM {source.table} s WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.id = s.id) "
                   "ORDER BY s.id")
    missing = [row[0] for row in cursor.fetchall()]
    for start in range(0, len(missing), COPY_CHUNK):
        ids = missing[start:start + COPY_CHUNK]
        vectors = demo_data.legacy_vectors(len(ids), seed + start)[:, :dims]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        cursor.cursor.copy_expert(f"COPY {table} (id, v) FROM STDIN WITH (FORMAT binary)",
                                  io.BytesIO(_id_vector_payload(ids, vectors)))
    return table


def add_legacy_index(cursor, table, column):
    """The legacy IVFFlat index, as migration 0001 builds it (on the empty table)."""
    cursor.execute(f"CREATE INDEX ON {table} USING ivfflat ({quote(column)} vector_l2_ops) "
                   f"WITH (lists = {LEGACY_LISTS})")


def ensure_pending_index(cursor, table, name, column):
    """The pending-rows partial index on `column` of scratch table `name` (`table` qualified),
    unless the copy has one (it has from phase 1 on)."""
    cursor.execute("SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND indpred IS NOT NULL "
                   "AND pg_get_expr(indpred, indrelid) LIKE %s", [table, f"%{column} IS NULL%"])
    if not cursor.fetchone()[0]:
        cursor.execute(f"CREATE INDEX ON {table} (id) WHERE {pending_sql(quote(column), alias=quote(name))}")


def settle(cursor, table):
    """VACUUM ANALYZE `table`, then CHECKPOINT if this role may; whether it could."""
    cursor.execute(f"VACUUM ANALYZE {table}")
    try:
        cursor.execute("CHECKPOINT")
    except DatabaseError:
        return False  # not a superuser nor pg_checkpoint: the run starts wherever the WAL is
    return True
