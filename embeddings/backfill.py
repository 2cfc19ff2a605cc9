"""The backfill engine: embed every segment that lacks a current vector, fast and crash-safe.

Each worker (one per process) runs a three-stage pipeline joined by short queues, so that
reading the next batch and writing the last one overlap with the model's work:

1. claim (a thread, its own database session): in one short transaction serialised by an
   advisory lock, drop the claims of dead workers, read the next `batch_size` pending segments
   past this worker's id cursor that nobody else has claimed, and record the claim (id range,
   this session's pid and start time) in `embeddings_backfill_claim`.
2. encode (the calling thread): texts to vectors. A vector with NaN or Inf, of the wrong size,
   or all zeros, and a text whose encoding raises (the batch is split to find it), is
   quarantined with its reason; the rest of the batch goes on.
3. write (a thread, its own session): one transaction per batch: binary COPY into a staging
   table and one UPDATE ... FROM (embeddings/writer.py) that writes a vector only where the
   text still has the md5 it was read with; quarantine entries are recorded or cleared, and
   the batch's claim deleted.

Consequences:
- kill -9 at any moment is safe: a batch is written entirely or not at all, and its claim dies
  with the worker's database session, so the next run (or another worker) takes it over.
- A segment whose text changes while its batch is in flight is not written (it stays pending
  and is embedded again with its new text); segments inserted during the run are embedded
  before the run reports completion.
- Blank text (empty, or only characters PostgreSQL's `[[:space:]]` matches under the
  database's locale) is never embedded: the row keeps NULL, is not pending, and the swap does
  not require it. It is counted in the report as `rows_blank`.
- Several workers (processes, machines) share the work through the claims table; each row is
  claimed by one worker at a time. A worker finishes when nothing is pending outside the
  quarantine, waiting for other live workers' batches if need be.
- Transient database errors (dropped connection, server restart, lock timeout) are retried with
  exponential backoff on a fresh connection; after DB_ATTEMPTS failures in a row the run stops
  with a BackfillError, and the next run resumes.
"""
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import psycopg2
from django.db import connections

from embeddings.writer import VectorWriter
from segments.schema import require_vector_column

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1000
QUEUE_DEPTH = 2
POLL_SECONDS = 0.5  # how often a worker looks again while other workers hold the last rows
DB_ATTEMPTS = 8  # tries of one database step before the run gives up
BACKOFF_FIRST_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 5.0
LOCK_TIMEOUT = "5s"  # a write blocked behind an application transaction gives up and retries
CLAIM_LOCK_KEY = 7_312_514_011  # pg_advisory_xact_lock key serialising the claim step
BEFORE_FIRST_ID = -(2**31) - 1  # below every int4 id
CANARY_TEXT = "A short sentence the model can always encode."
TRANSIENT_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
BLANK = "'^[[:space:]]*$'"
_END = object()  # a stage has no more batches


class BackfillError(Exception):
    """The backfill stopped before finishing; the message says why and what to do.

    `report` holds what was done until then.
    """

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class BackfillReport:
    column: str = ""
    rows_embedded: int = 0  # vectors written by this run
    rows_quarantined: int = 0  # rows this run could not embed (see embeddings_quarantine)
    rows_stale: int = 0  # vectors not written because the text changed (embedded again later)
    rows_remaining: int = 0  # segments with text and no vector at the end, quarantined included
    rows_in_quarantine: int = 0  # of rows_remaining, those quarantined
    rows_blank: int = 0  # segments whose text is blank: never embedded
    batches: int = 0
    seconds: float = 0.0

    @property
    def rows_per_second(self):
        return self.rows_embedded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self):
        return {**asdict(self), "seconds": round(self.seconds, 3), "rows_per_second": round(self.rows_per_second, 1)}


@dataclass
class ClaimedBatch:
    claim_id: int
    ids: list
    texts: list
    md5s: list


@dataclass
class EncodedBatch:
    claim_id: int
    ids: list  # rows with a good vector, in the order of `vectors`
    md5s: list
    vectors: np.ndarray
    failed: list = field(default_factory=list)  # (id, md5, reason)


# --- SQL ------------------------------------------------------------------------------------
# Table names stay unqualified: `search_path` decides which schema the engine works on.


def pending_sql(column):
    """Segments needing a vector. Written exactly as the partial index `..._todo` is defined,
    so the planner can answer it from that index."""
    return f"s.{column} IS NULL AND NOT (s.text ~ {BLANK})"


def quarantined_sql(retry_quarantined):
    """Rows the quarantine holds back: an entry for the same text (on a retry, only entries
    recorded by this run, so a row failing again is not retried in a loop)."""
    since = " AND q.last_failed_at >= %(since)s" if retry_quarantined else ""
    return (
        "EXISTS (SELECT 1 FROM embeddings_quarantine q "
        f"WHERE q.segment_id = s.id AND q.text_md5 = md5(s.text)::uuid{since})"
    )


def claim_sql(column, retry_quarantined=False):
    """The next pending, unclaimed, not quarantined segments after %(after)s, by id.

    The quarantine is checked by a scalar subquery, once per row the index scan yields: as
    an EXISTS, the planner may turn it into a hash join that reads every pending row past the
    cursor (and hashes their texts) for each batch when its statistics are stale, as they
    are during a backfill. This way a batch reads `limit` rows from the partial index and
    stops. (The claims check joins on a range, which only a nested loop can do.)
    """
    since = " AND q.last_failed_at >= %(since)s" if retry_quarantined else ""
    return f"""
        SELECT s.id, s.text, md5(s.text)::uuid FROM segments s
        WHERE {pending_sql(column)} AND s.id > %(after)s
          AND (SELECT q.text_md5 FROM embeddings_quarantine q WHERE q.segment_id = s.id{since})
              IS DISTINCT FROM md5(s.text)::uuid
          AND NOT EXISTS (SELECT 1 FROM embeddings_backfill_claim c WHERE s.id BETWEEN c.first_id AND c.last_id)
        ORDER BY s.id LIMIT %(limit)s
    """


DELETE_DEAD_CLAIMS = """
    DELETE FROM embeddings_backfill_claim c WHERE NOT EXISTS (
        SELECT 1 FROM pg_stat_activity a
        WHERE a.pid = c.worker_pid AND (a.backend_start IS NULL OR a.backend_start = c.worker_started_at))
"""
INSERT_CLAIM = """
    INSERT INTO embeddings_backfill_claim (first_id, last_id, worker_pid, worker_started_at, worker_name, claimed_at)
    SELECT %s, %s, a.pid, a.backend_start, %s, now() FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
    RETURNING id
"""
ADOPT_CLAIMS = """
    UPDATE embeddings_backfill_claim SET worker_pid = a.pid, worker_started_at = a.backend_start
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid() AND embeddings_backfill_claim.id = ANY(%s)
"""
QUARANTINE = """
    INSERT INTO embeddings_quarantine AS q (segment_id, text_md5, reason, attempts, first_failed_at, last_failed_at)
    SELECT f.id, f.md5, f.reason, 1, now(), now()
    FROM unnest(%s::int4[], %s::uuid[], %s::text[]) AS f(id, md5, reason)
    JOIN segments s ON s.id = f.id AND md5(s.text)::uuid = f.md5
    ON CONFLICT (segment_id) DO UPDATE SET
        attempts = CASE WHEN q.text_md5 = EXCLUDED.text_md5 THEN q.attempts + 1 ELSE 1 END,
        first_failed_at = CASE WHEN q.text_md5 = EXCLUDED.text_md5 THEN q.first_failed_at ELSE now() END,
        text_md5 = EXCLUDED.text_md5, reason = EXCLUDED.reason, last_failed_at = now()
"""


def obsolete_quarantine_sql(column):
    """Entries that no longer apply: segment gone, text changed, or vector present."""
    return f"""
        DELETE FROM embeddings_quarantine q WHERE NOT EXISTS (
            SELECT 1 FROM segments s
            WHERE s.id = q.segment_id AND s.{column} IS NULL AND md5(s.text)::uuid = q.text_md5)
    """


def worker_name():
    """host:pid of this process, as the claims and the sessions' application_name show it."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --- database sessions ----------------------------------------------------------------------


def open_connection(using, role, search_path=None):
    """A new psycopg2 connection (not in autocommit) to database `using`, for one stage."""
    wrapper = connections[using]
    private = type(wrapper)(wrapper.settings_dict, using)  # leaves the caller's connection alone
    params = private.get_connection_params()
    params["application_name"] = f"backfill_embeddings {role} {worker_name()}"[:63]
    connection = private.get_new_connection(params)
    try:
        connection.autocommit = False
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, false)", [LOCK_TIMEOUT])
            if search_path:
                cursor.execute("SELECT set_config('search_path', %s, false)", [search_path])
    except psycopg2.Error:
        connection.close()
        raise
    return connection


def backoff_seconds(attempt):
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1))


class Session:
    """One database session of the engine; each `run()` is one transaction, retried on a fresh
    connection after a transient error. `on_reconnect(cursor)` runs on every new connection but
    the first."""

    def __init__(self, using, role, search_path=None, stop=None, on_reconnect=None):
        self.using, self.role, self.search_path = using, role, search_path
        self.stop = stop or threading.Event()
        self.on_reconnect = on_reconnect
        self._connection = None
        self._connections_opened = 0

    def connection(self):
        """The open connection, opened (again) if need be."""
        if self._connection is None or self._connection.closed:
            self._connection = open_connection(self.using, self.role, self.search_path)
            self._connections_opened += 1
            if self._connections_opened > 1 and self.on_reconnect is not None:
                with self._connection, self._connection.cursor() as cursor:
                    self.on_reconnect(cursor)
        return self._connection

    def run(self, work, *args):
        """`work(connection, cursor, *args)` in one transaction; its result."""
        attempt = 1
        while True:
            try:
                connection = self.connection()
                with connection, connection.cursor() as cursor:
                    return work(connection, cursor, *args)
            except TRANSIENT_ERRORS as exc:
                self.close()
                self._wait_before_retry(attempt, exc)
            attempt += 1

    def _wait_before_retry(self, attempt, exc):
        message = " ".join(str(exc).split())  # PostgreSQL's DETAIL and CONTEXT lines, on one line
        if attempt >= DB_ATTEMPTS:
            raise BackfillError(
                f"The database kept failing ({DB_ATTEMPTS} attempts by the backfill {self.role}): "
                f"{message}. Check that the database server is up and that no session holds locks on "
                "segments for long (pg_stat_activity), then run `manage.py backfill_embeddings` again: "
                "it resumes where it stopped."
            ) from exc
        delay = backoff_seconds(attempt)
        logger.warning("database error in the backfill %s (attempt %d/%d): %s; retrying in %.1f s",
                       self.role, attempt, DB_ATTEMPTS, message, delay)
        if self.stop.wait(delay):
            raise BackfillError(f"The backfill {self.role} lost its database connection while stopping: {message}") from exc

    def close(self):
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass  # already broken: closing it is all that was asked
            self._connection = None


# --- encoding -------------------------------------------------------------------------------


def check_vectors(vectors, count, dims):
    """(list of float32 vectors or None, list of reasons or None) for an encoder's output."""
    if len(vectors) != count:
        raise BackfillError(f"The encoder returned {len(vectors)} vectors for {count} texts: it is broken.")
    array = vectors if isinstance(vectors, np.ndarray) else None
    if array is None or array.ndim != 2 or array.shape[1] != dims:
        return _check_each(vectors, dims)
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    nonzero = np.abs(array).max(axis=1, initial=0) > 0
    good = [row if ok else None for row, ok in zip(array, finite & nonzero)]
    reasons = [None if ok else ("vector contains NaN or Inf" if not fin else "vector is all zeros")
               for ok, fin in zip(finite & nonzero, finite)]
    return good, reasons


def _check_each(vectors, dims):
    good, reasons = [], []
    for vector in vectors:
        row = np.asarray(vector, dtype=np.float32).reshape(-1)
        if row.size != dims:
            reason = f"vector has {row.size} values, expected {dims}"
        elif not np.isfinite(row).all():
            reason = "vector contains NaN or Inf"
        elif not row.any():
            reason = "vector is all zeros"
        else:
            reason = None
        good.append(None if reason else row)
        reasons.append(reason)
    return good, reasons


def encode_texts(encoder, texts, dims, canary_checked=False):
    """Encode `texts`; a text whose encoding raises is found by splitting the batch.

    Returns (vectors, reasons) as in check_vectors. When a whole batch fails and so does a
    canary text, the encoder itself is broken: BackfillError, and nothing is quarantined.
    """
    try:
        return check_vectors(encoder.encode_documents(texts), len(texts), dims)
    except BackfillError:
        raise
    except Exception as exc:
        if len(texts) == 1:
            return [None], [f"encoding failed: {type(exc).__name__}: {exc}"[:1000]]
        if not canary_checked:
            check_canary(encoder, exc)
        middle = len(texts) // 2
        left = encode_texts(encoder, texts[:middle], dims, True)
        right = encode_texts(encoder, texts[middle:], dims, True)
        return left[0] + right[0], left[1] + right[1]


def check_canary(encoder, batch_error):
    """After a whole batch failed: BackfillError if the encoder cannot encode even a plain text."""
    try:
        encoder.encode_documents([CANARY_TEXT])
    except Exception as exc:
        raise BackfillError(
            f"The encoder fails on every text ({type(batch_error).__name__}: {batch_error}); nothing "
            "was quarantined. Fix the model setup (EMBEDDING_MODEL, EMBEDDING_DEVICE) and run "
            "`manage.py backfill_embeddings` again."
        ) from exc


def encode_batch(encoder, batch, dims):
    """The EncodedBatch of a ClaimedBatch."""
    vectors, reasons = encode_texts(encoder, batch.texts, dims)
    good = [i for i, reason in enumerate(reasons) if reason is None]
    return EncodedBatch(
        claim_id=batch.claim_id,
        ids=[batch.ids[i] for i in good],
        md5s=[batch.md5s[i] for i in good],
        vectors=np.array([vectors[i] for i in good], dtype=np.float32).reshape(len(good), dims),
        failed=[(batch.ids[i], batch.md5s[i], reason) for i, reason in enumerate(reasons) if reason is not None],
    )


# --- the run --------------------------------------------------------------------------------


def target_schema(using="default", search_path=None):
    """The EmbeddingSchema of the `segments` that `search_path` shows (SchemaNotReady before phase 1)."""
    if not search_path:
        return require_vector_column(using)
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('search_path')")
        previous = cursor.fetchone()[0]
        cursor.execute("SELECT set_config('search_path', %s, false)", [search_path])
    try:
        return require_vector_column(using)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('search_path', %s, false)", [previous])


def run_backfill(encoder, *, batch_size=None, limit=None, search_path=None, progress=None, using="default",
                 retry_quarantined=False):
    """Embed every pending segment of the target column with `encoder`; returns a BackfillReport.

    - `batch_size`: rows per claim, transaction and encode call (DEFAULT_BATCH_SIZE).
    - `limit`: stop after claiming this many rows (None: until nothing is pending).
    - `search_path`: SET on every connection the engine opens (its schema must hold `segments`,
      `embeddings_quarantine`, `embeddings_backfill_claim`, and see the `vector` type).
    - `progress(done, total)`: called from the writer thread after each batch.
    - `retry_quarantined`: try quarantined rows again (once each in this run).

    Raises SchemaNotReady before phase 1, DimensionMismatch when the encoder does not fit the
    column (before any row is read), BackfillError when the run cannot finish.
    """
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1 or (limit is not None and limit < 0):
        raise ValueError("batch_size must be at least 1 and limit at least 0")
    schema = target_schema(using, search_path)
    encoder.check_dimensions(schema.vector_column, schema.vector_dimensions)
    run = _Run(encoder, schema.vector_column, schema.vector_dimensions, batch_size=batch_size, limit=limit,
               search_path=search_path, progress=progress, using=using, retry_quarantined=retry_quarantined)
    return run.execute()


def backfill_plan(using="default", search_path=None, retry_quarantined=False):
    """What a run would do, read without writing or loading a model (for --dry-run)."""
    schema = target_schema(using, search_path)
    session = Session(using, "planner", search_path)
    try:
        counts = session.run(_count_plan, schema.vector_column)
    finally:
        session.close()
    pending, quarantined, blank = counts
    return {
        "phase": schema.phase,
        "column": schema.vector_column,
        "dimensions": schema.vector_dimensions,
        "rows_pending": pending,
        "rows_in_quarantine": quarantined,
        "rows_to_embed": pending if retry_quarantined else pending - quarantined,
        "rows_blank": blank,
    }


def count_pending(using="default", search_path=None):
    """Segments with text and no vector in the target column (an index-only count)."""
    schema = target_schema(using, search_path)
    session = Session(using, "planner", search_path)
    try:
        return session.run(_count_pending, schema.vector_column)
    finally:
        session.close()


def _count_pending(connection, cursor, column):
    cursor.execute(f"SELECT count(*) FROM segments s WHERE {pending_sql(column)}")
    return cursor.fetchone()[0]


def _count_plan(connection, cursor, column):
    cursor.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {quarantined_sql(False)}) FROM segments s WHERE {pending_sql(column)}"
    )
    pending, quarantined = cursor.fetchone()
    cursor.execute(f"SELECT count(*) FROM segments s WHERE s.text ~ {BLANK}")
    return pending, quarantined, cursor.fetchone()[0]


class _Run:
    """One worker's pipelined run (see the module docstring)."""

    def __init__(self, encoder, column, dims, *, batch_size, limit, search_path, progress, using,
                 retry_quarantined):
        self.encoder, self.column, self.dims = encoder, column, dims
        self.batch_size, self.limit, self.progress = batch_size, limit, progress
        self.retry_quarantined = retry_quarantined
        self.report = BackfillReport(column=column)
        self.stop = threading.Event()
        self.failures = []
        self.lock = threading.Lock()
        self.open_claims = set()
        self.claimed_queue = queue.Queue(QUEUE_DEPTH)
        self.encoded_queue = queue.Queue(QUEUE_DEPTH)
        self.control = Session(using, "control", search_path, self.stop)
        self.reader = Session(using, "reader", search_path, self.stop, on_reconnect=self._adopt_claims)
        self.writer = Session(using, "writer", search_path, self.stop)
        self.claim_query = claim_sql(column, retry_quarantined)
        self.since = None
        self.total = 0
        self.done = 0

    def execute(self):
        started = time.monotonic()
        try:
            self.since, self.total = self.control.run(self._prepare)
            if self.limit is not None:
                self.total = min(self.total, self.limit)
            self._report_progress()
            threads = [threading.Thread(target=self._guarded, args=(stage,), name=f"backfill-{stage.__name__}")
                       for stage in (self._claim_stage, self._write_stage)]
            for thread in threads:
                thread.start()
            try:
                self._guarded(self._encode_stage)
            except BaseException:  # KeyboardInterrupt: stop the other stages too
                self.stop.set()
                raise
            finally:
                for thread in threads:
                    thread.join()
        finally:
            self.report.seconds = time.monotonic() - started
            self._finish()
        if self.failures:
            error = self.failures[0]
            if isinstance(error, BackfillError):
                error.report = self.report
            raise error
        return self.report

    def _guarded(self, stage):
        try:
            stage()
        except Exception as exc:
            self.failures.append(exc)
            self.stop.set()

    # The stages.

    def _claim_stage(self):
        after, claimed = BEFORE_FIRST_ID, 0
        while not self.stop.is_set():
            room = self.batch_size if self.limit is None else min(self.batch_size, self.limit - claimed)
            if room <= 0:
                break
            batch = self.reader.run(self._claim, after, room)
            if batch is not None:
                claimed, after = claimed + len(batch.ids), batch.ids[-1]
                if not self._put(self.claimed_queue, batch):
                    return
            elif after != BEFORE_FIRST_ID:
                after = BEFORE_FIRST_ID  # once more from the start: texts changed behind the cursor
            elif self.reader.run(self._count_open) == 0:
                break
            else:
                self.stop.wait(POLL_SECONDS)  # the last rows are in batches in flight (any worker's)
        self._put(self.claimed_queue, _END)

    def _encode_stage(self):
        while True:
            batch = self._get(self.claimed_queue)
            if batch is _END:
                self._put(self.encoded_queue, _END)
                return
            if not self._put(self.encoded_queue, encode_batch(self.encoder, batch, self.dims)):
                return

    def _write_stage(self):
        while True:
            batch = self._get(self.encoded_queue)
            if batch is _END:
                return
            written, quarantined = self.writer.run(self._write, batch)
            with self.lock:
                self.open_claims.discard(batch.claim_id)
                self.report.batches += 1
                self.report.rows_embedded += written
                self.report.rows_stale += len(batch.ids) - written
                self.report.rows_quarantined += quarantined
                self.done += len(batch.ids) + len(batch.failed)
            self._report_progress()

    def _put(self, target, item):
        while not self.stop.is_set():
            try:
                target.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, source):
        while True:
            try:
                return source.get(timeout=0.2)
            except queue.Empty:
                if self.stop.is_set():
                    return _END

    def _report_progress(self):
        if self.progress is not None:
            self.total = max(self.total, self.done)
            self.progress(self.done, self.total)

    # The transactions.

    def _prepare(self, connection, cursor):
        cursor.execute(obsolete_quarantine_sql(self.column))
        cursor.execute(f"SELECT now(), count(*) FROM segments s WHERE {pending_sql(self.column)}")
        return cursor.fetchone()

    def _claim(self, connection, cursor, after, limit):
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CLAIM_LOCK_KEY])
        cursor.execute(DELETE_DEAD_CLAIMS)
        cursor.execute(self.claim_query, {"after": after, "limit": limit, "since": self.since})
        rows = cursor.fetchall()
        if not rows:
            return None
        cursor.execute(INSERT_CLAIM, [rows[0][0], rows[-1][0], worker_name()])
        claim_id = cursor.fetchone()[0]
        connection.commit()
        with self.lock:
            self.open_claims.add(claim_id)
        ids, texts, md5s = (list(column) for column in zip(*rows))
        return ClaimedBatch(claim_id, ids, texts, md5s)

    def _count_open(self, connection, cursor):
        cursor.execute(
            f"SELECT count(*) FROM segments s WHERE {pending_sql(self.column)} "
            f"AND NOT {quarantined_sql(self.retry_quarantined)}",
            {"since": self.since},
        )
        return cursor.fetchone()[0]

    def _adopt_claims(self, cursor):
        """After a reconnect, the claims in flight are moved to the new session (else they
        would look dead to other workers)."""
        with self.lock:
            claims = sorted(self.open_claims)
        if claims:
            cursor.execute(ADOPT_CLAIMS, [claims])

    def _write(self, connection, cursor, batch):
        writer = VectorWriter(connection, self.column, self.dims)
        written = writer.write(batch.ids, batch.md5s, batch.vectors)
        if batch.ids:
            cursor.execute(f"DELETE FROM embeddings_quarantine q USING (SELECT id FROM {writer.staging_table} "
                           "LIMIT %s) st WHERE q.segment_id = st.id", [len(batch.ids)])
        quarantined = 0
        if batch.failed:
            ids, md5s, reasons = zip(*batch.failed)
            cursor.execute(QUARANTINE, [list(ids), [str(m) for m in md5s], list(reasons)])
            quarantined = cursor.rowcount
            for segment_id, _, reason in batch.failed:
                logger.warning("segment %s quarantined: %s", segment_id, reason)
        cursor.execute("DELETE FROM embeddings_backfill_claim WHERE id = %s", [batch.claim_id])
        return written, quarantined

    def _finish(self):
        """Release this run's leftover claims, count what remains, close the sessions."""
        try:
            with self.lock:
                claims = sorted(self.open_claims)
            self.report.rows_remaining, self.report.rows_in_quarantine, self.report.rows_blank = (
                self.control.run(self._final_counts, claims)
            )
        except BackfillError as exc:
            logger.warning("could not count the remaining rows: %s", exc)
        finally:
            for session in (self.reader, self.writer, self.control):
                session.close()

    def _final_counts(self, connection, cursor, claims):
        if claims:
            cursor.execute("DELETE FROM embeddings_backfill_claim WHERE id = ANY(%s)", [claims])
        return _count_plan(connection, cursor, self.column)
