"""The backfill engine: embed every segment that lacks a current vector, fast and crash-safe.

Each worker (one per process) runs a three-stage pipeline joined by short queues, so that
reading the next batch and writing the last one overlap with the model's work:

1. claim (a thread, its own database session): in one short transaction serialised by an
   advisory lock, drop the claims of dead workers, read the next `batch_size` pending segments
   past this worker's id cursor that nobody else has claimed, and record the claim (id range,
   this session's pid and start time) in `embeddings_backfill_claim`.
2. encode (the calling thread): texts to vectors, the texts of up to `Tuning.encode_window`
   claims already waiting in one call. A vector with NaN or Inf, of the wrong size, or all
   zeros, and a text whose encoding raises (the batch is split to find it), is quarantined with
   its reason; the rest of the batch goes on.
3. write (`Tuning.writers` threads, each with its own session): one transaction per batch:
   binary COPY into a staging table and one UPDATE ... FROM (embeddings/writer.py) that writes a
   vector only where the text still has the md5 it was read with; quarantine entries are
   recorded or cleared, and the batch's claim deleted. The commit does not wait for the WAL
   flush (`synchronous_commit = off` for the transaction): a server crash can lose the last
   batches, whose rows are then pending again, never a part of one.

In the expanded phase every UPDATE of the backfill is non-HOT (the pending-rows partial index
references the new column, and the row grows by the vector's 1.5 kB), so it also inserts into
every index of the table. The legacy L2 IVFFlat index is by far the dearest of them (a 1536-dim
copy of the vector per row); no cosine query uses it, and segments/switch/legacy_index.py lets
the operator drop it before the backfill and build it again later.

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

The engine, by module: `sql` (the SQL text), `session` (database sessions with retries),
`encode` (the encode-and-check step), `pipeline` (one worker's run and its Tuning), `stages`
(each stage's busy and waiting time), `report` (what a run returns or raises). This package
holds the settings and the entry points.
"""
from django.db import connections

from segments.schema import require_vector_column

from .encode import ClaimedBatch, EncodedBatch, encode_batch, encode_texts
from .pipeline import BEFORE_FIRST_ID, UNTUNED, Run, Tuning, count_plan
from .report import BackfillError, BackfillReport
from .session import Session, backoff_seconds
from .sql import SET_SEARCH_PATH, claim_sql, count_pending_sql, pending_sql

__all__ = [
    "BACKOFF_FIRST_SECONDS", "BACKOFF_MAX_SECONDS", "BEFORE_FIRST_ID", "DB_ATTEMPTS", "DEFAULT_BATCH_SIZE",
    "LOCK_TIMEOUT", "UNTUNED", "BackfillError", "BackfillReport", "ClaimedBatch", "EncodedBatch", "Tuning",
    "backfill_plan",
    "backoff_seconds", "claim_sql", "count_pending", "encode_batch", "encode_texts", "pending_sql",
    "run_backfill", "target_schema",
]

DEFAULT_BATCH_SIZE = 1000
# Retry settings: `session` reads them from this package at each use, so a change here applies at once.
DB_ATTEMPTS = 8  # tries of one database step before the run gives up
BACKOFF_FIRST_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 5.0
LOCK_TIMEOUT = "5s"  # a write blocked behind an application transaction gives up and retries


def target_schema(using="default", search_path=None):
    """The EmbeddingSchema of the `segments` that `search_path` shows (SchemaNotReady before phase 1)."""
    if not search_path:
        return require_vector_column(using)
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('search_path')")
        previous = cursor.fetchone()[0]
        cursor.execute(SET_SEARCH_PATH, [search_path])
    try:
        return require_vector_column(using)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(SET_SEARCH_PATH, [previous])


def run_backfill(encoder, *, batch_size=None, limit=None, search_path=None, progress=None, using="default",
                 retry_quarantined=False, tuning=None):
    """Embed every pending segment of the target column with `encoder`; returns a BackfillReport.

    - `batch_size`: rows per claim, transaction and encode call (DEFAULT_BATCH_SIZE).
    - `limit`: stop after claiming this many rows (None: until nothing is pending).
    - `search_path`: SET on every connection the engine opens (its schema must hold `segments`,
      `embeddings_quarantine`, `embeddings_backfill_claim`, `segments_backfill_worker`, and see
      the `vector` type).
    - `progress(done, total)`: called from the writer thread after each batch.
    - `retry_quarantined`: try quarantined rows again (once each in this run).
    - `tuning`: a Tuning (write sessions, claims per encode call, commit mode); Tuning() by default.

    Raises SchemaNotReady before phase 1, DimensionMismatch when the encoder does not fit the
    column (before any row is read), BackfillError when the run cannot finish. An encoder with a
    `check_target(search_path)` method is asked first, and may refuse the target by raising
    (the benchmark's simulated GPU refuses every schema but its scratch ones).
    """
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1 or (limit is not None and limit < 0):
        raise ValueError("batch_size must be at least 1 and limit at least 0")
    check_target = getattr(encoder, "check_target", None)
    if check_target is not None:
        check_target(search_path)
    schema = target_schema(using, search_path)
    encoder.check_dimensions(schema.vector_column, schema.vector_dimensions)
    run = Run(encoder, schema.vector_column, schema.vector_dimensions, batch_size=batch_size, limit=limit,
              search_path=search_path, progress=progress, using=using, retry_quarantined=retry_quarantined,
              tuning=tuning)
    return run.execute()


def backfill_plan(using="default", search_path=None, retry_quarantined=False):
    """What a run would do, read without writing or loading a model (for --dry-run)."""
    schema = target_schema(using, search_path)
    pending, quarantined, blank = _read(using, search_path, count_plan, schema.vector_column)
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
    return _read(using, search_path, _count_pending, schema.vector_column)


def _count_pending(connection, cursor, column):
    cursor.execute(count_pending_sql(column))
    return cursor.fetchone()[0]


def _read(using, search_path, work, *args):
    """`work(connection, cursor, *args)` in a short-lived planner session; its result."""
    session = Session(using, "planner", search_path)
    try:
        return session.run(work, *args)
    finally:
        session.close()
