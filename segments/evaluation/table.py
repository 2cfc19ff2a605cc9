"""What the evaluation reads from `segments`, and nothing else: it never writes the table.

Every read runs in a READ ONLY transaction under `SET LOCAL statement_timeout`, so a slow query on
a large table gives up instead of holding anything. The rows judged are those with both vectors
(the old model's and the new one's): on a partial backfill the evaluation judges the part done.

Vectors come out by binary COPY, parsed with numpy (both columns of a row side by side), so a pool
of thousands of 1536-dim vectors reads in about a second; the text formatting of `::text` would
take many times longer.
"""
import io
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from django.db import connections, transaction

from askdrchaffee import postgres
from segments.schema import TABLE, blank_sql, vector_column_types

COPY_HEADER_BYTES = 19  # signature (11), flags (4), header extension length (4)
VALUE_TYPES = {"vector": ">f4", "halfvec": ">f2"}


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str  # vector or halfvec
    dimensions: int

    @property
    def sql_type(self):
        return f"{self.type_name}({self.dimensions})"


def column(name, using="default"):
    type_name, dimensions = vector_column_types(using)[name]
    return Column(name, type_name, dimensions)


@dataclass(frozen=True)
class SegmentRow:
    id: int
    video_id: str
    start_sec: float
    end_sec: float
    text: str
    speaker: str | None
    video_type: str | None


@contextmanager
def reading(using, timeout_seconds):
    """A cursor in a READ ONLY transaction whose statements stop after `timeout_seconds`, set in one statement
    (inside a caller's transaction: a savepoint, read-write as the caller's is, with the timeout put back after)."""
    connection = connections[using]
    outer = connection.in_atomic_block
    timeout = f"{max(1, math.ceil(timeout_seconds * 1000))}ms"
    with transaction.atomic(using=using), connection.cursor() as cursor:
        if outer:
            with postgres.local_settings(cursor, statement_timeout=timeout):
                yield cursor
        else:
            cursor.execute("SET TRANSACTION READ ONLY; SELECT set_config('statement_timeout', %s, true)", [timeout])
            yield cursor


def both(old, new, alias="s"):
    """SQL: the segment has text and both vectors."""
    return f"{alias}.{old} IS NOT NULL AND {alias}.{new} IS NOT NULL AND NOT ({blank_sql(alias)})"


def counts(cursor, old, new):
    """(segments with text, segments with text and both vectors)."""
    cursor.execute(f"SELECT count(*) FILTER (WHERE NOT ({blank_sql()})), count(*) FILTER (WHERE {both(old, new)}) "
                   f"FROM {TABLE} s")
    return cursor.fetchone()


def sample_ids(cursor, old, new, size, seed):
    """Up to `size` ids of segments with both vectors, the same ones for the same seed and rows."""
    cursor.execute(f"SELECT s.id FROM {TABLE} s WHERE {both(old, new)} ORDER BY md5(s.id::text || %s) LIMIT %s",
                   [str(seed), size])
    return [row[0] for row in cursor.fetchall()]


def pool_ids(cursor, old, new, size, seed):
    """The ids of whole videos' segments with both vectors, videos drawn at random (the same for the same
    seed) until about `size` segments; every such segment when the table holds no more than `size`."""
    cursor.execute(f"""
        SELECT s.id FROM {TABLE} s JOIN (
            SELECT video_id, count(*) AS n, sum(count(*)) OVER (ORDER BY md5(video_id || %s), video_id) AS running
            FROM {TABLE} s WHERE {both(old, new)} GROUP BY video_id) v ON v.video_id = s.video_id
        WHERE {both(old, new)} AND v.running - v.n < %s ORDER BY s.id""", [str(seed), size])
    return [row[0] for row in cursor.fetchall()]


def segments(cursor, ids):
    """{id: SegmentRow} of `ids`."""
    cursor.execute(f"SELECT id, video_id, start_sec, end_sec, text, speaker_label, video_type FROM {TABLE} "
                   "WHERE id = ANY(%s)", [list(ids)])
    return {row[0]: SegmentRow(*row) for row in cursor.fetchall()}


def rows_with_text(cursor):
    cursor.execute(f"SELECT count(*) FROM {TABLE} s WHERE NOT ({blank_sql()})")
    return cursor.fetchone()[0]


def vectors(cursor, ids, columns):
    """(ids, [float32 (n, dims) array per column]) of the rows of `ids` that have a vector in every one
    of `columns` (Column), read by one binary COPY."""
    if not ids:
        return np.empty(0, dtype=np.int64), [np.empty((0, c.dimensions), dtype=np.float32) for c in columns]
    present = " AND ".join(f"{c.name} IS NOT NULL" for c in columns)
    listed = ",".join(str(int(i)) for i in ids)
    sql = (f"COPY (SELECT id, {', '.join(c.name for c in columns)} FROM {TABLE} WHERE id IN ({listed}) AND {present} "
           "ORDER BY id) TO STDOUT (FORMAT binary)")
    buffer = io.BytesIO()
    cursor.cursor.copy_expert(sql, buffer)
    return _parse(buffer.getvalue(), columns)


def _parse(data, columns):
    layout = [("fields", ">i2"), ("id_size", ">i4"), ("id", ">i4")]
    for number, c in enumerate(columns):
        layout += [(f"size{number}", ">i4"), (f"dim{number}", ">i2"), (f"unused{number}", ">i2"),
                   (f"v{number}", VALUE_TYPES[c.type_name], (c.dimensions,))]
    dtype = np.dtype(layout)
    body = data[COPY_HEADER_BYTES: len(data) - 2]
    if len(body) % dtype.itemsize or struct.unpack(">h", data[-2:])[0] != -1:
        raise ValueError("Unexpected binary COPY data: a vector of another width in the column?")
    rows = np.frombuffer(body, dtype=dtype)
    return rows["id"].astype(np.int64), [rows[f"v{n}"].astype(np.float32) for n in range(len(columns))]
