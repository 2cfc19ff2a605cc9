"""The search suite's scratch tables: one per pgvector type, loaded by binary COPY, indexed by HNSW.

Each table is (id int4 PRIMARY KEY, video_id int4 NOT NULL, embedding vector(d) or halfvec(d)),
without an index on video_id, so that a filtered search can only use the HNSW index or scan.
Values travel in pgvector's binary format (vector_recv and halfvec_recv read int16 dim, int16
unused = 0, then dim big-endian float4, or IEEE 754 binary16, values): a halfvec is sent already
rounded to float16, so the server converts nothing and `stored()` is exactly what the column
holds.

The HNSW build runs with the maintenance_work_mem and max_parallel_maintenance_workers of a
BuildSettings: given (--index-memory, --index-workers), else those segments/index_build.py plans
for the live build of as many values of the same type (the graph's estimated size plus headroom;
the parallel workers the server allows). Whether the graph fitted is read from pgvector's NOTICE
("hnsw graph no longer fits into maintenance_work_mem").
"""
import io
import time
from dataclasses import asdict, dataclass

import numpy as np

from embeddings.writer import VALUE_TYPES, copy_rows
from askdrchaffee.postgres import human_bytes
from segments import index_build
from segments.schema import HNSW_EF_CONSTRUCTION, HNSW_M
from segments.storage import STORAGES

COPY_CHUNK = 20_000
DID_NOT_FIT = "hnsw graph no longer fits into maintenance_work_mem"


def stored(vectors, type_name):
    """`vectors` as a column of `type_name` holds them (float16-rounded for halfvec), as float32
    (`vectors` itself when nothing is rounded)."""
    element = np.dtype(VALUE_TYPES[type_name]).newbyteorder("=")
    return np.asarray(vectors, dtype=np.float32).astype(element, copy=False).astype(np.float32, copy=False)


def create(cursor, table, type_name, dimensions):
    cursor.execute(f"CREATE TABLE {table} (id int4 PRIMARY KEY, video_id int4 NOT NULL, "
                   f"embedding {STORAGES[type_name].sql_type(dimensions)})")


def copy_payload(ids, videos, vectors, type_name="vector"):
    """Binary COPY data for the columns (id int4, video_id int4, embedding vector(d) or halfvec(d))."""
    return io.BytesIO(copy_rows([(">i4", ids), (">i4", videos)], vectors, type_name))


def load(cursor, table, type_name, ids, videos, vectors):
    """COPY the rows into `table` in chunks; returns the seconds it took (payloads included)."""
    started = time.perf_counter()
    for start in range(0, len(ids), COPY_CHUNK):
        part = slice(start, start + COPY_CHUNK)
        cursor.cursor.copy_expert(f"COPY {table} (id, video_id, embedding) FROM STDIN WITH (FORMAT binary)",
                                  copy_payload(ids[part], videos[part], vectors[part], type_name))
    return time.perf_counter() - started


@dataclass(frozen=True)
class BuildSettings:
    maintenance_work_mem: int  # bytes
    maintenance_work_mem_why: str
    parallel_workers: int
    parallel_workers_why: str
    graph_estimate_bytes: int  # segments/index_build.py's estimate of the graph

    def as_dict(self):
        return {**asdict(self), "maintenance_work_mem_human": human_bytes(self.maintenance_work_mem),
                "graph_estimate_human": human_bytes(self.graph_estimate_bytes)}


def build_settings(cursor, table, rows, type_name, memory=None, workers=None):
    """The BuildSettings of the HNSW index on `table`: `memory` (bytes) and `workers` when given,
    else what segments/index_build.py plans for a build of `rows` such values (the live build's)."""
    plan = index_build.plan(cursor, table, "embedding", HNSW_M, rows, STORAGES[type_name].cosine_opclass)
    if workers is None:
        workers, workers_why = plan.parallel_workers, f"as the live build plans it: {plan.parallel_workers_why}"
    else:
        workers_why = f"--index-workers (the live build would use {plan.parallel_workers})"
    if memory is None:
        memory, memory_why = plan.maintenance_work_mem, f"as the live build plans it: {plan.maintenance_work_mem_why}"
    else:
        memory_why = f"--index-memory (the live build would use {human_bytes(plan.maintenance_work_mem)})"
    return BuildSettings(memory, memory_why, workers, workers_why, plan.estimate.bytes)


def build_index(cursor, table, type_name, settings):
    """Build the HNSW index with `settings`; returns (seconds, whether the graph fitted in memory)."""
    notices = cursor.db.connection.notices
    del notices[:]
    cursor.execute(f"SET maintenance_work_mem = '{settings.maintenance_work_mem // 1024}kB'")
    cursor.execute(f"SET max_parallel_maintenance_workers = {int(settings.parallel_workers)}")
    started = time.perf_counter()
    try:
        cursor.execute(f"CREATE INDEX ON {table} USING hnsw (embedding {STORAGES[type_name].cosine_opclass}) "
                       f"WITH (m = {int(HNSW_M)}, ef_construction = {int(HNSW_EF_CONSTRUCTION)})")
    finally:
        cursor.execute("RESET maintenance_work_mem")
        cursor.execute("RESET max_parallel_maintenance_workers")
    seconds = time.perf_counter() - started
    cursor.execute(f"ANALYZE {table}")
    return seconds, not any(DID_NOT_FIT in notice for notice in notices)


def sizes(cursor, table):
    """{rows, column_bytes_per_row (mean pg_column_size of the vectors), table_bytes, index_bytes}."""
    cursor.execute(f"SELECT count(*), avg(pg_column_size(embedding))::float8, pg_table_size(%s::regclass) "
                   f"FROM {table}", [table])
    rows, column_bytes, table_bytes = cursor.fetchone()
    cursor.execute("SELECT coalesce(sum(pg_relation_size(indexrelid)), 0)::bigint FROM pg_index "
                   "WHERE indrelid = %s::regclass AND NOT indisprimary", [table])
    return {"rows": rows, "column_bytes_per_row": column_bytes, "table_bytes": table_bytes,
            "index_bytes": cursor.fetchone()[0]}


def shared_buffers(cursor):
    """The server's shared_buffers in bytes (an index larger than it is read through the OS cache)."""
    cursor.execute("SELECT pg_size_bytes(current_setting('shared_buffers'))")
    return cursor.fetchone()[0]
