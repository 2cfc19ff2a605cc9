"""The bulk write path for vectors: binary COPY into a staging table, then one UPDATE ... FROM.

Writing vectors one `UPDATE` at a time, or as text literals, is limited by per-statement and
formatting costs (see FACTS.md: ~1,700 and ~3,000 rows/s here). Instead, a whole batch is
sent as PostgreSQL's binary COPY format, built with numpy in one pass, into a temporary
staging table, and applied with a single `UPDATE ... FROM` that joins on the id.

The UPDATE writes a vector only where the segment still has the text it was computed from
(`md5(text)` equals the md5 read with the text), so a vector never lands on a text it does not
belong to, whatever the application wrote in the meantime. By default it also writes only
where the column is still NULL: a present vector is current (the staleness trigger clears it
when the text changes), so it is never overwritten.

The target column may be `vector` (float32) or `halfvec` (float16): the writer reads its type
from the catalogue at the first batch and sends the values in that type's binary format, so the
server converts nothing (a float16 payload is also half the size).

Each batch's transaction first takes the table's write lock (`ROW EXCLUSIVE`, which every UPDATE
takes anyway) and then asks the model ledger (embeddings/ledger.py) which column holds the writer's
model: a swap or an undo renames columns under a stronger lock, so from that moment the answer
holds until the commit. The writer follows its model's column through a swap, and refuses, writing
nothing, a column that holds another model's vectors.
"""
import io
import struct
import uuid

import numpy as np
import psycopg2
from django.db import DatabaseError

from embeddings import ledger

# Binary COPY: signature, flags (int32), header extension length (int32) ... rows ... -1 (int16).
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)
VALUE_TYPES = {"vector": ">f4", "halfvec": ">f2"}  # pgvector type: its binary value, big-endian
HALF_MAX = float(np.finfo(np.float16).max)


def copy_rows(fields, vectors, type_name="vector"):
    """Binary COPY data for rows of fixed-size `fields` [(numpy dtype, values)] followed by one
    vector(dims) or halfvec(dims) column holding `vectors`, an (n, dims) array.

    Each field is its byte length (int32) followed by its value, big-endian; pgvector's binary
    `vector` and `halfvec` are dim (int16), unused (int16, zero), then dim float32 (float16) values.
    """
    count, dims = vectors.shape
    layout = [("fields", ">i2")]
    for number, (dtype, _) in enumerate(fields):
        layout += [(f"size{number}", ">i4"), (f"field{number}", dtype)]
    layout += [("v_size", ">i4"), ("v_dim", ">i2"), ("v_unused", ">i2"), ("v", VALUE_TYPES[type_name], (dims,))]
    rows = np.empty(count, dtype=np.dtype(layout))
    rows["fields"] = len(fields) + 1
    for number, (dtype, values) in enumerate(fields):
        rows[f"size{number}"] = np.dtype(dtype).itemsize
        rows[f"field{number}"] = values
    rows["v_size"] = 4 + rows.dtype["v"].base.itemsize * dims
    rows["v_dim"], rows["v_unused"], rows["v"] = dims, 0, vectors
    return COPY_HEADER + rows.tobytes() + COPY_TRAILER


def md5_bytes(value):
    """The 16 bytes of an md5 given as a uuid.UUID, 16 raw bytes or a hex string."""
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == 16:
        return bytes(value)
    return uuid.UUID(str(value)).bytes


def copy_payload(ids, text_md5s, vectors, type_name="vector"):
    """Binary COPY data for the columns (id int4, text_md5 uuid, v vector(dims) or halfvec(dims)).

    `vectors` is an (n, dims) array; its values are sent as float32, exactly, or rounded to the
    nearest float16 for a halfvec (ValueError for a value beyond float16's range).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (rows, dims), not shape {vectors.shape}")
    count = vectors.shape[0]
    if not (len(ids) == len(text_md5s) == count):
        raise ValueError(f"{len(ids)} ids, {len(text_md5s)} md5s and {count} vectors: they must match")
    if type_name == "halfvec" and count and float(np.nanmax(np.abs(vectors))) > HALF_MAX:
        raise ValueError(f"a value beyond ±{HALF_MAX:g} cannot be stored in a halfvec column")
    md5s = np.frombuffer(b"".join(md5_bytes(m) for m in text_md5s), dtype="V16")
    return copy_rows([(">i4", np.asarray(ids, dtype=np.int64)), ("V16", md5s)], vectors, type_name)


class VectorWriter:
    """Writes batches of vectors of the model `identity` (a ledger.ModelIdentity) into
    `table`.`column`, or wherever a swap has moved that model's column since, through a temporary
    staging table.

    `connection` is a psycopg2 connection or a Django connection. `.write()` runs in the
    caller's transaction when one is open (so it commits or rolls back with the caller's other
    statements), otherwise in a transaction of its own.
    """

    def __init__(self, connection, column, dims, table="segments", *, identity, overwrite=False, type_name=None):
        self.connection = connection
        self.column = column
        self.dims = int(dims)
        self.table = table
        self.identity = identity
        self.overwrite = overwrite
        self.type_name = type_name  # the column's type (`vector` or `halfvec`) when known; else read at the first batch

    def write(self, ids, text_md5s, vectors):
        """Stage the batch and apply it with one UPDATE; returns the number of rows updated.

        A row whose text no longer has the md5 given (it changed, or the row is gone) is not
        written; nor, unless `overwrite`, a row that already has a vector.
        """
        if len(ids) == 0:
            return 0
        with self.connection.cursor() as cursor:
            own_transaction = self._autocommit()
            if own_transaction:
                cursor.execute("BEGIN")
            try:
                self._follow_model(cursor)
                payload = copy_payload(ids, text_md5s, vectors, self.type_name)
                updated = self._stage_and_update(cursor, payload, len(ids))
            except BaseException:
                if own_transaction:
                    self._rollback(cursor)
                raise
            if own_transaction:
                cursor.execute("COMMIT")
        return updated

    def _autocommit(self):
        autocommit = getattr(self.connection, "autocommit", False)
        if callable(getattr(self.connection, "get_autocommit", None)):
            autocommit = self.connection.get_autocommit()  # a Django connection
        return bool(autocommit)

    @staticmethod
    def _rollback(cursor):
        try:
            cursor.execute("ROLLBACK")
        except (psycopg2.Error, DatabaseError):
            pass  # the connection is gone: the server rolled the transaction back itself

    def _follow_model(self, cursor):
        """Take the write lock, then point the writer at its model's column (ledger.ModelMismatch
        when the column holds another model's vectors)."""
        cursor.execute(f"LOCK TABLE {self.table} IN ROW EXCLUSIVE MODE")
        column = ledger.column_for_writer(cursor, self.table, self.column, self.identity,
                                          lambda: self.type_name or self._column_type(cursor))
        if column != self.column or self.type_name is None:
            self.column = column
            self.type_name = self._column_type(cursor)

    def _column_type(self, cursor):
        """`vector` or `halfvec`: the type of the target column (ValueError for any other)."""
        # The column as the UPDATE will name it (quoted or not, through the search_path).
        cursor.execute(f"SELECT {self.column} FROM {self.table} LIMIT 0")
        cursor.execute("SELECT typname FROM pg_type WHERE oid = %s", [cursor.description[0][1]])
        (type_name,) = cursor.fetchone()
        if type_name not in VALUE_TYPES:
            raise ValueError(f"{self.table}.{self.column} must be a vector or halfvec column, not {type_name}.")
        return type_name

    @property
    def staging_table(self):
        """Per transaction; holds exactly the batch being written (see _stage_and_update)."""
        return f"pg_temp.embedding_staging_{self.type_name}_{self.dims}"

    def _stage_and_update(self, cursor, payload, rows):
        # Dropped at the commit: a temporary table kept for the session would stay on a server
        # connection that a pooler hands to the application's next transaction. The DELETE clears an
        # earlier batch of the same open transaction.
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {self.staging_table} "
            f"(id int4, text_md5 uuid, v {self.type_name}({self.dims})) ON COMMIT DROP"
        )
        cursor.execute(f"DELETE FROM {self.staging_table}")
        cursor.copy_expert(f"COPY {self.staging_table} (id, text_md5, v) FROM STDIN WITH (FORMAT binary)",
                           io.BytesIO(payload))
        return self._update(cursor, rows)

    def _update(self, cursor, rows):
        # The staging table has no statistics, so the planner would guess its size from its
        # pages (20x too many rows here) and hash the whole target table for every batch. The
        # LIMIT tells it the true size: it then probes the primary key once per staged row, and
        # a batch costs the same on a table of a thousand rows or of ten million.
        only_missing = "" if self.overwrite else f" AND s.{self.column} IS NULL"
        cursor.execute(
            f"UPDATE {self.table} s SET {self.column} = st.v "
            f"FROM (SELECT id, text_md5, v FROM {self.staging_table} LIMIT %s) st "
            f"WHERE s.id = st.id AND md5(s.text)::uuid = st.text_md5{only_missing}",
            [rows],
        )
        return cursor.rowcount
