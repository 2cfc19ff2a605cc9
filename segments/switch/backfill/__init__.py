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
  quarantine, waiting for other live workers' batches if need be; rows that arrived while it ran and
  that another worker holds (a follower, with the application inserting all the while) are left to
  that worker and counted as remaining.
- It yields to the database's health: before each batch's write the worker's Throttle
  (segments/switch/throttle.py) holds it back while an operator has paused the switch
  (`embedding_switch pause`), while a streaming replica lags more than BACKFILL_MAX_REPLICA_LAG
  seconds, or while the run is over its rate cap (--max-rows-per-second). A batch held back stays
  claimed and in hand, and is written when the wait ends; nothing is lost or written twice.
- Transient database errors (dropped connection, server restart, lock timeout) are retried with
  exponential backoff on a fresh connection; after DB_ATTEMPTS failures in a row the run stops
  with a BackfillError, and the next run resumes.

The engine, by module: `sql` (the SQL text), `session` (database sessions with retries),
`encode` (the encode-and-check step), `pipeline` (one worker's run and its Tuning), `stages`
(each stage's busy and waiting time), `report` (what a run returns or raises). This package
holds the settings and the entry points.
"""
from embeddings import ledger
from segments.schema import TABLE, require_vector_column, stored_samples, vector_column_types
from segments.switch.throttle import SETTING as THROTTLE_SETTING
from segments.switch.throttle import Throttle

from .encode import ClaimedBatch, EncodedBatch, encode_batch, encode_texts
from .pipeline import BEFORE_FIRST_ID, UNTUNED, Run, Target, Tuning, Worker, count_plan
from .report import BackfillError, BackfillReport
from .session import Session, backoff_seconds, connector
from .sql import claim_sql, count_pending_sql, pending_sql

__all__ = [
    "BACKOFF_FIRST_SECONDS", "BACKOFF_MAX_SECONDS", "BEFORE_FIRST_ID", "DB_ATTEMPTS", "DEFAULT_BATCH_SIZE",
    "LOCK_TIMEOUT", "UNTUNED", "BackfillError", "BackfillReport", "ClaimedBatch", "EncodedBatch", "Target",
    "Tuning", "Worker", "backfill_plan", "backoff_seconds", "claim_sql", "connector", "count_pending",
    "encode_batch", "encode_texts", "pending_sql", "run_backfill", "target_for",
]

DEFAULT_BATCH_SIZE = 1000
# Retry settings: `session` reads them from this package at each use, so a change here applies at once.
DB_ATTEMPTS = 8  # tries of one database step before the run gives up
BACKOFF_FIRST_SECONDS = 0.25
BACKOFF_MAX_SECONDS = 5.0
LOCK_TIMEOUT = "5s"  # a write blocked behind an application transaction gives up and retries


def run_backfill(encoder, *, batch_size=None, limit=None, connect=None, progress=None, using="default",
                 retry_quarantined=False, tuning=None, max_rows_per_second=None, max_replica_lag=THROTTLE_SETTING,
                 say=None):
    """Embed every pending segment of the column holding `encoder`'s model; returns a BackfillReport.

    - `batch_size`: rows per claim (and per write transaction): DEFAULT_BATCH_SIZE.
    - `limit`: stop after claiming this many rows (None: until nothing is pending).
    - `connect(role)`: a factory of new psycopg2 connections (session.connector(using) by default);
      the table its search_path shows is the one filled.
    - `progress(done, total)`: called from the writer thread after each batch.
    - `retry_quarantined`: try quarantined rows again (once each in this run).
    - `tuning`: a Tuning (write sessions, claims per encode call, commit mode); Tuning() by default.
    - `max_rows_per_second`, `max_replica_lag`: the run's throttle (segments/switch/throttle.py): a rate
      cap (None: none) and the replicas' lag limit in seconds (None: none; BACKFILL_MAX_REPLICA_LAG by
      default). An operator's `embedding_switch pause` holds it back too. `say(line)` hears when it
      waits and when it goes on.

    Raises SchemaNotReady before phase 1, DimensionMismatch when the encoder does not fit the
    column, ledger.ModelMismatch when the column holds another model's vectors (before any row is
    read; or at the end, when another machine's model wrote the column first), BackfillError when
    the run cannot finish.
    """
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1 or (limit is not None and limit < 0):
        raise ValueError("batch_size must be at least 1 and limit at least 0")
    connect = connect or connector(using)
    throttle = Throttle(connect, max_replica_lag=max_replica_lag, max_rows_per_second=max_rows_per_second, say=say)
    worker = Worker(encoder, connect, tuning, throttle=throttle)
    try:
        target = worker.control.run(lambda connection, cursor: target_for(cursor, worker))
        worker.start(target.column, batch_size)
        run = Run(worker, target, batch_size=batch_size, limit=limit, progress=progress,
                  retry_quarantined=retry_quarantined)
        report = run.execute()
        worker.control.run(lambda connection, cursor: target_for(cursor, worker))  # another machine's model?
        return report
    finally:
        worker.close()


def target_for(cursor, worker, doing="this backfill"):
    """The Target of `worker`: the column holding its model's vectors at the table's phase (the next
    model's column before the swap, `embedding` after it, or a column a swap renamed), and the model
    ledger's entry its batches write under. Checked before any row is read: the encoder's width against
    the column's (DimensionMismatch), and the model against the one the ledger records for the column,
    or, for a column with vectors and no recorded model, against a few of its stored vectors
    (ledger.ModelMismatch); a column with no recorded model is recorded as this model's.

    Call it in a transaction (`Session.run`): it takes the table's write lock, so a swap or an undo
    renames the columns before or after it, never between its reads. Two round trips (four with the
    transaction's begin and commit), one more for each record or sample it needs; the pass then writes
    under the entry without reading the ledger again (each batch's message checks that the entry still
    names its column)."""
    types = vector_column_types(cursor=cursor)
    schema = require_vector_column(cursor=cursor, types=types)
    recorded = ledger.entries(cursor, TABLE, before=f"LOCK TABLE {TABLE} IN ROW EXCLUSIVE MODE")
    column = worker.column_now(schema.vector_column, recorded)
    if column is None:
        found = recorded[schema.vector_column]
        raise ledger.mismatch(TABLE, schema.vector_column, found, worker.identity,
                              ledger.same_model(worker.identity, found.identity)[1], doing)
    storage, dims = types[column]
    worker.encoder.check_dimensions(column, dims)
    if column not in recorded:
        samples = stored_samples(cursor, column)
        if samples:
            adopted = ledger.adopt(cursor, TABLE, column, worker.encoder, storage, samples, doing)
            recorded = {**recorded, column: adopted}
    entry = ledger.entry_for_writer(cursor, TABLE, column, worker.identity, lambda: storage, recorded=recorded)
    return Target(entry.column, dims, storage, entry.id)


def backfill_plan(using="default", retry_quarantined=False):
    """What a run would do, read without writing or loading a model (for --dry-run)."""
    schema = require_vector_column(using)
    pending, quarantined, blank = _read(using, count_plan, schema.vector_column)
    return {
        "phase": schema.phase,
        "column": schema.vector_column,
        "dimensions": schema.vector_dimensions,
        "rows_pending": pending,
        "rows_in_quarantine": quarantined,
        "rows_to_embed": pending if retry_quarantined else pending - quarantined,
        "rows_blank": blank,
    }


def count_pending(using="default", column=None):
    """Segments with text and no vector in `column` (the new model's column by default): an
    index-only count."""
    column = column or require_vector_column(using).vector_column
    return _read(using, _count_pending, column)


def _count_pending(session, column):
    return session.query(count_pending_sql(column))[0][0]


def _read(using, work, *args):
    """`work(session, *args)` in a short-lived planner session; its result."""
    session = Session(connector(using), "planner")
    try:
        return work(session, *args)
    finally:
        session.close()
