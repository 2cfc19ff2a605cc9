"""One worker and its passes: the claim, encode and write stages, joined by short queues.

A `Worker` holds what lasts as long as the process: the model (and its identity in the model
ledger), the database sessions and the heartbeat. A `Run` is one pass over what is pending: the
claim stage is a thread with the worker's reader session; the write stage is `Tuning.writers`
threads, each with a session of its own, so that one batch's UPDATE runs while the next is staged
(PostgreSQL runs each session's statements on one core); the encode stage runs in the calling
thread and encodes up to `Tuning.encode_window` claims in one call. A failure in any stage stops
the others; the pass then releases its claims, counts what is left, and raises the first failure.
Each stage's busy and waiting time is kept (stages.py): the report names the stage that limited
the pass. `backfill_embeddings` runs one pass; `backfill_embeddings --follow` runs a pass whenever
segments arrive (follow.py), with the same worker.

The pass writes into the column that holds its model's vectors: each batch's transaction asks the
model ledger after taking the table's write lock (embeddings/writer.py), so a swap or an undo
during the pass moves the writes with the column. A claim read under a column name that a swap
has just renamed is read again under the new name.
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass

from psycopg2 import errors

from embeddings import ledger
from embeddings.writer import VectorWriter
from segments.schema import TABLE

from . import sql
from .encode import ClaimedBatch, checked, encode_claims
from .heartbeat import LEASE_SECONDS, Heartbeat
from .report import BackfillError, BackfillReport
from .session import Session, worker_name
from .stages import StageClock, limiting_stage, stage_figures

logger = logging.getLogger(__package__)

QUEUE_DEPTH = 2  # encoded batches waiting for a writer
POLL_SECONDS = 0.5  # how often a worker looks again while other workers hold the last rows
BEFORE_FIRST_ID = -(2**31) - 1  # below every int4 id
_END = object()  # a stage has no more batches


@dataclass(frozen=True)
class Tuning:
    """How a worker spreads its work; none of it changes what is written.

    - `writers`: write sessions. Each batch's UPDATE is one statement that PostgreSQL runs on one
      core; with two sessions one batch is applied while the next is staged and committed.
    - `encode_window`: claims encoded in one call when that many are ready (more texts sorted by
      length together; fuller device batches).
    - `synchronous_commit`: False lets a batch's commit return before its WAL reaches the disk
      (`SET LOCAL synchronous_commit = off`). A server crash can then lose the last batches
      committed, never part of one: their rows are pending again and the next pass embeds them.
    """

    writers: int = 2
    encode_window: int = 4
    synchronous_commit: bool = False

    def __post_init__(self):
        if self.writers < 1 or self.encode_window < 1:
            raise ValueError("writers and encode_window must be at least 1")


# The engine's settings before the tuning above existed: one write session, one claim per
# encode call, every commit waiting for its WAL flush. The benchmark measures both.
UNTUNED = Tuning(writers=1, encode_window=1, synchronous_commit=True)
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"


def count_plan(connection, cursor, column, blank=True):
    """(pending, of those quarantined, blank) segments: a Session.run work function. The pending
    counts read the partial index of pending rows; the blank count scans the whole table, so a
    caller that does not report it (a follower's pass) leaves it out: None."""
    cursor.execute(sql.count_pending_and_quarantined_sql(column))
    pending, quarantined = cursor.fetchone()
    if not blank:
        return pending, quarantined, None
    cursor.execute(sql.COUNT_BLANK)
    return pending, quarantined, cursor.fetchone()[0]


@dataclass
class Target:
    """Where a pass writes: the column holding the worker's model's vectors, its width and type."""

    column: str
    dims: int
    storage: str


def model_identity(encoder):
    """The encoder's ModelIdentity (its vectors of the ledger's probe texts); BackfillError when the
    encoder cannot encode even those."""
    try:
        return ledger.identity_of(encoder)
    except Exception as exc:
        raise BackfillError(
            f"The encoder fails on every text, even the model ledger's probe texts ({type(exc).__name__}: {exc}); "
            "nothing was read or written. Fix the model "
            "setup (EMBEDDING_MODEL, EMBEDDING_DEVICE) and run `manage.py backfill_embeddings` again."
        ) from exc


class Worker:
    """What one worker process keeps across passes: the encoder and its identity in the model ledger,
    the database sessions (from `connect(role)`, a connection factory), and the heartbeat.
    `forever`: its sessions retry without end (the follower), instead of DB_ATTEMPTS times."""

    def __init__(self, encoder, connect, tuning=None, mode="backfill", stop=None, forever=False):
        self.encoder = encoder
        self.identity = model_identity(encoder)
        self.tuning = tuning or Tuning()
        self.stop = stop or threading.Event()
        self.heartbeat = Heartbeat(encoder, mode, self.identity.name)
        self.control = Session(connect, "control", self.stop, forever=forever)
        self.reader = Session(connect, "reader", self.stop, on_reconnect=self._adopt_claims, forever=forever)
        self.writers = [Session(connect, "writer", self.stop, forever=forever) for _ in range(self.tuning.writers)]
        self.beat_session = Session(connect, "heartbeat", self.stop)
        self.started = False

    def start(self, column):
        """Write the heartbeat row and start its thread (once)."""
        if self.started:
            return
        self.control.run(lambda connection, cursor: self.heartbeat.start(cursor, column, not self.control.pooled))
        self.heartbeat.run_in_background(self.beat_session)
        self.started = True

    def close(self):
        """Mark the run finished and close the sessions."""
        self.heartbeat.stop_background()
        try:
            if self.started:
                self.control.run(lambda connection, cursor: self.heartbeat.finish(cursor))
        except BackfillError as exc:
            logger.warning("could not mark the worker finished: %s", exc)
        finally:
            for session in (self.reader, *self.writers, self.control, self.beat_session):
                session.close()

    def column_now(self, cursor, column):
        """The column holding this worker's model now: `column`, or its name after a swap or an undo;
        None when another model's vectors are recorded there and this model has no column."""
        recorded = ledger.entries(cursor, TABLE)
        for entry in recorded.values():
            if ledger.same_model(self.identity, entry.identity)[0] and entry.source != "simulated":
                return entry.column
        return None if column in recorded else column

    def _adopt_claims(self, cursor):
        """After a reconnect, the claims in flight name the new session (else, on a direct
        connection, they would look dead to other workers)."""
        cursor.execute(sql.ADOPT_CLAIMS, [str(self.heartbeat.id)])


class Run:
    """One pass of a worker over the pending segments of `target` (see the module docstring)."""

    def __init__(self, worker, target, *, batch_size, limit=None, progress=None, retry_quarantined=False,
                 count_blank=True):
        self.worker, self.target = worker, target
        self.count_blank = count_blank  # a follower's passes leave out the final count's table scan
        self.encoder, self.tuning, self.stop = worker.encoder, worker.tuning, worker.stop
        self.batch_size, self.limit, self.progress = batch_size, limit, progress
        self.retry_quarantined = retry_quarantined
        self.report = BackfillReport(column=target.column)
        self.batch_done = threading.Event()  # set by a write thread after each batch, and on stopping
        self.stages_stop = threading.Event()  # this pass's stages stop (a failure, or the worker stopping)
        self.failures = []
        self.lock = threading.Lock()
        self.open_claims = set()
        self.claimed_queue = queue.Queue(max(QUEUE_DEPTH, self.tuning.encode_window))
        self.encoded_queue = queue.Queue(max(QUEUE_DEPTH, self.tuning.writers))
        self.clocks = {"claim": [StageClock()], "encode": [StageClock()],
                       "write": [StageClock() for _ in worker.writers]}
        self.claim_query = sql.claim_sql(target.column, retry_quarantined)
        self.since = None
        self.total = 0
        self.done = 0

    @property
    def stopping(self):
        return self.stages_stop.is_set() or self.stop.is_set()

    def execute(self):
        """Run the stages to the end; the BackfillReport, or the first stage's failure."""
        started = time.monotonic()
        try:
            self.since, self.total = self._following_renames(self.worker.control, self._prepare)
            if self.limit is not None:
                self.total = min(self.total, self.limit)
            self._report_progress()
            threads = [threading.Thread(target=self._guarded, args=(self._claim_stage,), name="backfill-claim")]
            threads += [threading.Thread(target=self._guarded, args=(self._write_stage, session, clock),
                                         name=f"backfill-write-{number}")
                        for number, (session, clock) in enumerate(zip(self.worker.writers, self.clocks["write"]), 1)]
            for thread in threads:
                thread.start()
            try:
                self._guarded(self._encode_stage)
            except BaseException:  # KeyboardInterrupt: stop the other stages too
                self.stages_stop.set()
                raise
            finally:
                for thread in threads:
                    thread.join()
        finally:
            self.report.seconds = time.monotonic() - started
            self.report.stages = stage_figures(self.clocks, self.report.seconds)
            self.report.limited_by = limiting_stage(self.report.stages)
            self.report.column = self.target.column
            self._finish()
        if self.failures:
            error = self.failures[0]
            if isinstance(error, BackfillError):
                error.report = self.report
            raise error
        return self.report

    def _guarded(self, stage, *args):
        try:
            stage(*args)
        except Exception as exc:
            self.failures.append(exc)
            self.stages_stop.set()
            self.batch_done.set()

    # The stages.

    def _claim_stage(self):
        clock = self.clocks["claim"][0]
        after, claimed = BEFORE_FIRST_ID, 0
        while not self.stopping:
            room = self.batch_size if self.limit is None else min(self.batch_size, self.limit - claimed)
            if room <= 0:
                break
            with clock.timing("busy"):
                batch = self._claim_renamed_safely(after, room)
            if batch is not None:
                claimed, after = claimed + len(batch.ids), batch.ids[-1]
                with clock.timing("waiting_for_room"):
                    if not self._put(self.claimed_queue, batch):
                        return
            elif after != BEFORE_FIRST_ID:
                after = BEFORE_FIRST_ID  # once more from the start: texts changed behind the cursor
            else:
                self.batch_done.clear()
                with clock.timing("busy"):
                    left = self._following_renames(self.worker.reader, self._count_open)
                if left == 0:
                    break
                # The last rows are in batches in flight: this worker's (look again as soon as one
                # of them is written) or another worker's (look again after POLL_SECONDS).
                with clock.timing("waiting_for_input"):
                    self.batch_done.wait(POLL_SECONDS)
        self._put(self.claimed_queue, _END)

    def _claim_renamed_safely(self, after, room):
        return self._following_renames(self.worker.reader, self._claim, after, room)

    def _following_renames(self, session, work, *args):
        """`session.run(work, *args)`; when a swap or an undo renamed the column since the pass began,
        the column's new name is looked up in the model ledger and the work done again."""
        try:
            return session.run(work, *args)
        except errors.UndefinedColumn as exc:
            if self.target.column not in (exc.diag.message_primary or ""):
                raise  # another column is missing: not a rename of this pass's column
            column = self.worker.control.run(lambda connection, cursor: self.worker.column_now(cursor, None))
            if column is None:
                raise BackfillError(f"{TABLE}.{self.target.column} is gone, and no column holds "
                                    f"{self.worker.identity.name}'s vectors any more.") from None
            self._moved_to(column)
            return session.run(work, *args)

    def _moved_to(self, column):
        with self.lock:
            if column != self.target.column:
                logger.info("the column of %s is now %s (was %s)", self.worker.identity.name, column,
                            self.target.column)
                self.target.column = column
                self.claim_query = sql.claim_sql(column, self.retry_quarantined)

    def _encode_stage(self):
        clock = self.clocks["encode"][0]
        ended = False
        while not ended:
            with clock.timing("waiting_for_input"):
                batches, ended = self._window()
            if batches:
                with clock.timing("busy"):
                    encoded = encode_claims(self.encoder, batches, self.target.dims)
                with clock.timing("waiting_for_room"):
                    if not all(self._put(self.encoded_queue, batch) for batch in encoded):
                        return
        for _ in self.worker.writers:
            self._put(self.encoded_queue, _END)

    def _window(self):
        """(up to encode_window claimed batches, whether the claim stage has ended): waits for
        the first, then takes only those already queued."""
        first = self._get(self.claimed_queue)
        if first is _END:
            return [], True
        batches = [first]
        while len(batches) < self.tuning.encode_window:
            try:
                batch = self.claimed_queue.get_nowait()
            except queue.Empty:
                break
            if batch is _END:
                return batches, True
            batches.append(batch)
        return batches, False

    def _write_stage(self, session, clock):
        while True:
            with clock.timing("waiting_for_input"):
                batch = self._get(self.encoded_queue)
            if batch is _END:
                return
            with clock.timing("busy"):
                batch = checked(batch, self.target.dims)
                written, quarantined = session.run(self._write, batch)
            with self.lock:
                self.open_claims.discard(batch.claim_id)
                self.report.batches += 1
                self.report.rows_embedded += written
                self.report.rows_stale += len(batch.ids) - written
                self.report.rows_quarantined += quarantined
                self.done += len(batch.ids) + len(batch.failed)
                self._report_progress()
            self.batch_done.set()

    def _put(self, target, item):
        while not self.stopping:
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
                if self.stopping:
                    return _END

    def _report_progress(self):
        """Call `progress(done, total)`; the write threads call it holding the lock, in order."""
        if self.progress is not None:
            self.total = max(self.total, self.done)
            self.progress(self.done, self.total)

    def _open_claim_ids(self):
        with self.lock:
            return sorted(self.open_claims)

    # The transactions.

    def _prepare(self, connection, cursor):
        cursor.execute(sql.obsolete_quarantine_sql(self.target.column))
        cursor.execute(sql.start_sql(self.target.column))
        return cursor.fetchone()

    def _claim(self, connection, cursor, after, limit):
        self._commit_setting(cursor)
        cursor.execute(sql.LOCK_CLAIMS, [sql.CLAIM_LOCK_KEY])
        cursor.execute(sql.DELETE_DEAD_CLAIMS)
        cursor.execute(self.claim_query, {"after": after, "limit": limit, "since": self.since})
        rows = cursor.fetchall()
        if not rows:
            return None
        cursor.execute(sql.INSERT_CLAIM, {"first": rows[0][0], "last": rows[-1][0], "name": worker_name(),
                                          "worker": str(self.worker.heartbeat.id), "lease": LEASE_SECONDS,
                                          "session": not self.worker.reader.pooled})
        claim_id = cursor.fetchone()[0]
        connection.commit()
        with self.lock:
            self.open_claims.add(claim_id)
        ids, texts, md5s = (list(column) for column in zip(*rows))
        return ClaimedBatch(claim_id, ids, texts, md5s)

    def _count_open(self, connection, cursor):
        cursor.execute(sql.count_open_sql(self.target.column, self.retry_quarantined), {"since": self.since})
        return cursor.fetchone()[0]

    def _commit_setting(self, cursor):
        if not self.tuning.synchronous_commit:
            cursor.execute(ASYNC_COMMIT)

    def _write(self, connection, cursor, batch):
        self._commit_setting(cursor)
        written = 0
        if batch.ids:
            writer = VectorWriter(connection, self.target.column, self.target.dims, identity=self.worker.identity,
                                  type_name=self.target.storage)  # the target's type: no catalogue read a batch
            written = writer.write(batch.ids, batch.md5s, batch.vectors)
            self._moved_to(writer.column)
            cursor.execute(sql.unquarantine_staged_sql(writer.staging_table), [len(batch.ids)])
        quarantined = 0
        if batch.failed:
            ids, md5s, reasons = zip(*batch.failed)
            cursor.execute(sql.QUARANTINE, [list(ids), [str(m) for m in md5s], list(reasons)])
            quarantined = cursor.rowcount
            for segment_id, _, reason in batch.failed:
                logger.warning("segment %s quarantined: %s", segment_id, reason)
        cursor.execute(sql.DELETE_CLAIM, [batch.claim_id])
        self.worker.heartbeat.batch(cursor, len(batch.ids) + len(batch.failed), self.target.column)
        return written, quarantined

    def _finish(self):
        """Release this pass's leftover claims and count what remains."""
        try:
            self.report.rows_remaining, self.report.rows_in_quarantine, self.report.rows_blank = (
                self._following_renames(self.worker.control, self._final_counts, self._open_claim_ids())
            )
        except BackfillError as exc:
            logger.warning("could not count the remaining rows: %s", exc)

    def _final_counts(self, connection, cursor, claims):
        if claims:
            cursor.execute(sql.DELETE_CLAIMS, [claims])
        return count_plan(connection, cursor, self.target.column, blank=self.count_blank)
