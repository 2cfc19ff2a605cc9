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
takes anyway) and then checks the model ledger (embeddings/ledger.py): a swap or an undo renames
columns under a stronger lock, so from that moment the answer holds until the commit. The writer
follows its model's column through a swap, and refuses, writing nothing, a column that holds
another model's vectors. The whole batch is one message to the server (two round trips: the COPY
asks for its data), so that a writer far from its database pays the distance twice a batch, not
once a statement; `write_ahead` sends that message before the batch is made, and the batch, once
there, is one round trip from its commit.
"""
import io
import struct
import uuid

import numpy as np
import psycopg2
from django.db import DatabaseError

from askdrchaffee.postgres import quote_literal
from askdrchaffee.round_trips import message
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

    `connection` is a psycopg2 connection or a Django connection. `.write()` sends a batch as one
    message (askdrchaffee/round_trips.py): on a connection in autocommit mode it is a transaction
    of its own, committed by the server at its end, and costs two round trips whatever the batch
    holds; in the caller's transaction it commits or rolls back with the caller's other statements.

    The first batch checks the model ledger in full (`resolve`, a few round trips, and the record of
    the model on a column's first write); every later batch asks the server, inside its own
    message, whether the ledger entry it found still names the same column, and only when it does
    not (a swap or an undo renamed the column) is the ledger read again and the batch sent again.
    """

    def __init__(self, connection, column, dims, table="segments", *, identity, overwrite=False, type_name=None):
        self.connection = connection
        self.column = column
        self.dims = int(dims)
        self.table = table
        self.identity = identity
        self.overwrite = overwrite
        self.type_name = type_name  # the column's type (`vector` or `halfvec`) when known; else read at the first batch
        self.entry_id = None  # the ledger entry of the column written, once resolved

    def write(self, ids, text_md5s, vectors, *, prologue=(), before=(), after=()):
        """Stage the batch and apply it with one UPDATE, in one message; returns the number of rows updated.

        A row whose text no longer has the md5 given (it changed, or the row is gone) is not
        written; nor, unless `overwrite`, a row that already has a vector. `prologue` (settings for the
        transaction), `before` and `after` are statements of the caller's, already bound to their
        values (cursor.mogrify), sent in the same message: the prologue first, then the COPY, the
        write lock and the ledger's check, then `before` and `after` (they may name `staging_table`),
        the UPDATE last.
        """
        if len(ids) == 0:
            return 0
        payload = copy_payload(ids, text_md5s, vectors, self.type_name or "vector")
        with self.connection.cursor() as cursor:
            if self.entry_id is None:
                self.resolve(cursor)
                payload = copy_payload(ids, text_md5s, vectors, self.type_name)
            try:
                return self._send(cursor, payload, len(ids), prologue, before, after)
            except Exception as exc:
                if not ledger_moved(exc) or not self._autocommit():
                    raise
            self.resolve(cursor)  # a swap or an undo renamed the column: follow it
            payload = copy_payload(ids, text_md5s, vectors, self.type_name)
            return self._send(cursor, payload, len(ids), prologue, before, after)

    def write_ahead(self, next_batch, rows, *, prologue=(), before=(), after=()):
        """write(), its message sent before its batch is known: the server's call for the data (a round
        trip) crosses the wire while the batch is still being made, and the batch, once there, costs one
        round trip more. `next_batch()` is called when the server waits for the data; it returns (ids,
        md5s, vectors) of at most `rows` rows, or raises to take the message back: the server then rolls
        back what the message began, nothing is written, and its exception is raised here.

        The writer must have resolved its ledger entry, on a connection in autocommit mode: the message is
        a transaction of its own. `before` and `after` cannot depend on the batch (they may read
        `staging_table`). Rows written."""
        if self.entry_id is None or not self._autocommit():
            raise ValueError("write_ahead needs a resolved writer on a connection in autocommit mode")
        source = _BatchAhead(next_batch, rows, self.type_name)
        with self.connection.cursor() as cursor:
            try:
                self._copy(cursor, source, rows, prologue, before, after)
            except (psycopg2.Error, DatabaseError):
                if source.withdrawn is not None:
                    raise source.withdrawn from None
                raise
            return cursor.rowcount

    def resolve(self, cursor):
        """Take the write lock and ask the model ledger which column holds the writer's model (recording
        it on a column's first write; ledger.ModelMismatch when the column holds another model's
        vectors), in a transaction of its own unless the caller is in one."""
        own_transaction = self._autocommit()
        lock = f"LOCK TABLE {self.table} IN ROW EXCLUSIVE MODE"
        try:  # the lock and the ledger's read in one message (with the BEGIN of its own transaction)
            recorded = ledger.entries(cursor, self.table, before=f"BEGIN; {lock}" if own_transaction else lock)
            entry = ledger.entry_for_writer(cursor, self.table, self.column, self.identity,
                                            lambda: self.type_name or self._column_type(cursor), recorded=recorded)
            if entry.column != self.column or self.type_name is None:
                self.column = entry.column
                self.type_name = self._column_type(cursor)
            self.entry_id = entry.id
        except BaseException:
            if own_transaction:
                self._rollback(cursor)
            raise
        if own_transaction:
            cursor.execute("COMMIT")

    def follow(self, other):
        """Take what `other` (a VectorWriter of the same model) learnt of the ledger: its column, type and
        entry (the check each batch makes keeps it honest)."""
        self.column, self.type_name, self.entry_id = other.column, other.type_name, other.entry_id

    def _autocommit(self):
        autocommit = getattr(self.connection, "autocommit", False)
        if callable(getattr(self.connection, "get_autocommit", None)):
            autocommit = self.connection.get_autocommit() and not self.connection.in_atomic_block  # a Django connection
        return bool(autocommit)

    @staticmethod
    def _rollback(cursor):
        try:
            cursor.execute("ROLLBACK")
        except (psycopg2.Error, DatabaseError):
            pass  # the connection is gone: the server rolled the transaction back itself

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
        """Per transaction; holds exactly the batch being written (see _send)."""
        return f"pg_temp.embedding_staging_{self.type_name}_{self.dims}"

    def ledger_check_sql(self):
        """A statement that fails (LEDGER_MOVED) unless the ledger entry this writer resolved still names
        its column: run after the write lock, whatever renamed the column has committed or not begun."""
        return (
            "DO $check$ BEGIN IF NOT EXISTS (SELECT 1 FROM " + ledger.LEDGER + f" WHERE id = {int(self.entry_id)} "
            f"AND column_name = {quote_literal(self.column)} AND retired_at IS NULL) THEN RAISE EXCEPTION "
            f"{quote_literal(LEDGER_MOVED)}; END IF; END $check$"
        )

    def _send(self, cursor, payload, rows, prologue, before, after):
        # In one piece: psycopg2 sends a COPY's data a chunk at a time (8 kB by default), taking the GIL back
        # for each, and beside the other stages' threads each take can wait a switch interval (5 ms).
        self._copy(cursor, io.BytesIO(payload), rows, prologue, before, after, size=max(len(payload), 8192))
        return cursor.rowcount

    def _copy(self, cursor, source, rows, prologue, before, after, size=8192):
        # The COPY comes first: the message's transaction is open while the server waits for the batch's
        # data (a round trip), and holds no lock on the table then; its write lock, the ledger's check and
        # the caller's statements follow once the data is there, so the table's locks last only as long as
        # the server's own work (a swap waiting for them does not wait for the wire). The staging table is
        # dropped at the commit: a temporary table kept for the session would stay on a server connection
        # that a pooler hands to the application's next transaction. The DELETE clears an earlier batch of
        # the same open transaction (a caller's). The UPDATE comes last: its row count is what the message
        # answers.
        statements = [
            *prologue,
            f"CREATE TEMP TABLE IF NOT EXISTS {self.staging_table} "
            f"(id int4, text_md5 uuid, v {self.type_name}({self.dims})) ON COMMIT DROP",
            f"DELETE FROM {self.staging_table}",
            f"COPY {self.staging_table} (id, text_md5, v) FROM STDIN WITH (FORMAT binary)",
            f"LOCK TABLE {self.table} IN ROW EXCLUSIVE MODE",
            self.ledger_check_sql(),
            *before,
            *after,
            self._update_sql(rows),
        ]
        cursor.copy_expert(message(*statements), source, size=size)

    def _update_sql(self, rows):
        # The staging table has no statistics, so the planner would guess its size from its
        # pages (20x too many rows here) and hash the whole target table for every batch. The
        # LIMIT tells it the true size: it then probes the primary key once per staged row, and
        # a batch costs the same on a table of a thousand rows or of ten million.
        only_missing = "" if self.overwrite else f" AND s.{self.column} IS NULL"
        return (
            f"UPDATE {self.table} s SET {self.column} = st.v "
            f"FROM (SELECT id, text_md5, v FROM {self.staging_table} LIMIT {int(rows)}) st "
            f"WHERE s.id = st.id AND md5(s.text)::uuid = st.text_md5{only_missing}"
        )


class _BatchAhead:
    """The COPY data of VectorWriter.write_ahead, as psycopg2 reads it: the batch's payload in one piece,
    asked of `next_batch()` only when the server waits for it; what that raised is kept in `withdrawn`
    (psycopg2 then ends the COPY with an error of its own)."""

    def __init__(self, next_batch, rows, type_name):
        self.next_batch, self.rows, self.type_name = next_batch, rows, type_name
        self.sent = False
        self.withdrawn = None

    def read(self, size=-1):
        if self.sent:
            return b""
        self.sent = True
        try:
            ids, text_md5s, vectors = self.next_batch()
            if len(ids) > self.rows:
                raise ValueError(f"a batch of {len(ids)} rows for a message written for at most {self.rows}")
            return copy_payload(ids, text_md5s, vectors, self.type_name)
        except BaseException as exc:
            self.withdrawn = exc
            raise


LEDGER_MOVED = "the model ledger no longer names this writer's column"


def ledger_moved(exc):
    """True when `exc` (psycopg2's or Django's) is the ledger check's failure (VectorWriter.ledger_check_sql)."""
    cause = getattr(exc, "__cause__", None) if not isinstance(exc, psycopg2.Error) else exc
    diag = getattr(cause, "diag", None)
    return getattr(cause, "pgcode", None) == "P0001" and getattr(diag, "message_primary", None) == LEDGER_MOVED
