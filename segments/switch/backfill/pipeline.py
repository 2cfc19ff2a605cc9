"""One worker and its passes: the claim, encode and write stages, joined by short queues.

A `Worker` holds what lasts as long as the process: the model (and its identity in the model
ledger), the database sessions and the heartbeat. A `Run` is one pass over what is pending: the
claim stage is a thread with the worker's reader session; the write stage is `Tuning.writers`
threads, each with a session of its own, so that one batch's UPDATE runs while the next is staged
(PostgreSQL runs each session's statements on one core); the encode stage runs in the calling
thread and streams windows of up to `Tuning.encode_window` claims into the encoder (encode.py). A
failure in any stage stops the others; the pass then releases its claims, counts what is left, and
raises the first failure. Each stage's busy and waiting time is kept (stages.py): the report names
the stage that limited the pass. `backfill_embeddings` runs one pass; `backfill_embeddings
--follow` runs one pass that waits for arrivals instead of ending (follow.py).

The pass writes into the column that holds its model's vectors: each batch's transaction checks the
model ledger after taking the table's write lock (embeddings/writer.py), so a swap or an undo
during the pass moves the writes with the column. A claim read under a column name that a swap
has just renamed is read again under the new name.

**Far from the database** every step is one message (session.py): a claim one round trip, a batch
two, whatever they hold. What the distance still costs is hidden: the worker measures its round
trip when it starts (and its heartbeat as it runs), claims several batches a round trip so that the
encoder never waits for one, and keeps as many batches in flight as the link needs, one per write
session (`writers_needed`: more sessions when a batch spends more time on the wire than on the
server), starting sessions as its measures call for them. A writer sends its batch's message before
the batch is encoded (Tuning.write_ahead): the COPY's call for the data crosses the wire meanwhile,
and a batch, once encoded, is one round trip from its commit. The pass starts writing as soon as its
first batch is encoded: its target came with the model ledger's entry (backfill.target_for), the
throttle's first look is on its way with the first claim, and the first encode call takes one claim.
"""
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

from psycopg2 import errors

from embeddings import ledger
from embeddings.writer import VectorWriter, ledger_moved
from segments.schema import TABLE

from . import sql
from .encode import ClaimedBatch, checked, encode_windows
from .heartbeat import LEASE_SECONDS, Heartbeat
from .report import BackfillError, BackfillReport
from .session import TRANSIENT_ERRORS, Session, worker_name
from .stages import StageClock, limiting_stage, stage_figures

logger = logging.getLogger(__package__)

QUEUE_DEPTH = 2  # encoded batches waiting for a writer
POLL_SECONDS = 0.5  # how often a worker looks again while other workers hold the last rows
BEFORE_FIRST_ID = -(2**31) - 1  # below every int4 id
_END = object()  # a stage has no more batches
# Far from the database (a round trip of at least AHEAD_ROUND_TRIP_SECONDS) a writer sends its next batch's
# message before the batch is encoded, as long as batches come within AHEAD_WAIT_SECONDS (Tuning.write_ahead).
AHEAD_ROUND_TRIP_SECONDS = 0.005
AHEAD_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class Tuning:
    """How a worker spreads its work; none of it changes what is written.

    - `writers`: write sessions next to the database. Each batch's UPDATE is one statement that
      PostgreSQL runs on one core; with two sessions one batch is applied while the next is staged
      and committed. Far from it, more (`writers_needed`), up to `max_writers`.
    - `encode_window`: claims encoded in one call when that many are ready (more texts sorted by
      length together; fuller device batches).
    - `synchronous_commit`: False lets a batch's commit return before its WAL reaches the disk
      (`SET LOCAL synchronous_commit = off`). A server crash can then lose the last batches
      committed, never part of one: their rows are pending again and the next pass embeds them.
    - `write_ahead`: a writer sends its next batch's message before the batch is encoded, so that the
      COPY's call for the data crosses the wire meanwhile and the batch, once there, costs one round
      trip (Run._write_ahead). None: when the round trip is AHEAD_ROUND_TRIP_SECONDS or more.
    """

    writers: int = 2
    encode_window: int = 4
    synchronous_commit: bool = False
    max_writers: int = 8
    write_ahead: bool | None = None

    def __post_init__(self):
        if self.writers < 1 or self.encode_window < 1:
            raise ValueError("writers and encode_window must be at least 1")
        if self.max_writers < self.writers:
            object.__setattr__(self, "max_writers", self.writers)

    @property
    def session_settings(self):
        """What the claim and write sessions' transactions set for themselves."""
        return {} if self.synchronous_commit else {"synchronous_commit": "off"}


SERVER_SECONDS_PER_ROW = 5e-5  # a batch's server time before any is measured (1,000 rows: 50 ms)
MOST_BATCHES_PER_CLAIM = 8


def writers_needed(tuning, round_trip, server_seconds):
    """Write sessions that keep as many batches in flight as the link needs: a batch's message spends
    its server time there and two round trips on the wire; `tuning.writers` sessions keep up with no
    wire at all, so the link needs writers x 2 round trips / server time more of them (rounded: a
    link that costs little next to the server adds none), up to `tuning.max_writers`."""
    server_seconds = max(server_seconds, 0.005)
    needed = tuning.writers + round(tuning.writers * 2 * round_trip / server_seconds)
    return max(tuning.writers, min(tuning.max_writers, needed))


def batches_per_claim(round_trip):
    """Batches one claiming round trip takes: one next to the database, one more per 40 ms of round
    trip, so that the claims stay ahead of the encoder however far the database is."""
    return max(1, min(MOST_BATCHES_PER_CLAIM, 1 + math.ceil(round_trip / 0.04 - 1e-9)))


# The engine's settings before the tuning above existed: one write session, one claim per
# encode call, every commit waiting for its WAL flush. The benchmark measures both.
UNTUNED = Tuning(writers=1, encode_window=1, synchronous_commit=True, max_writers=1)


def count_plan(session, column, blank=True, claims=()):
    """(pending, of those quarantined, blank) segments, in one message on `session` that first releases
    `claims` (ids). The pending counts read the partial index of pending rows; the blank count scans
    the whole table, so a caller that does not report it (a follower's pass) leaves it out: None."""
    return tuple(session.query(sql.final_counts_message(column, blank), {"claims": list(claims)})[0])


@dataclass
class Target:
    """Where a pass writes: the column holding the worker's model's vectors, its width and type, and the
    id of the model ledger's entry its batches write under (backfill.target_for resolves it)."""

    column: str
    dims: int
    storage: str
    entry_id: int


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

    def __init__(self, encoder, connect, tuning=None, mode="backfill", stop=None, forever=False, throttle=None):
        self.encoder = encoder
        self.identity = model_identity(encoder)
        self.tuning = tuning or Tuning()
        self.stop = stop or threading.Event()
        self.throttle = throttle  # segments.switch.throttle.Throttle: asked before each batch's write
        self.heartbeat = Heartbeat(encoder, mode, self.identity.name, throttle=throttle)
        self.connect, self.forever = connect, forever
        settings = self.tuning.session_settings
        self.control = Session(connect, "control", self.stop, forever=forever)
        self.reader = Session(connect, "reader", self.stop, on_reconnect=self._adopt_claims, forever=forever,
                              settings=settings)
        self.writers = [self.new_writer() for _ in range(self.tuning.writers)]
        self.beat_session = Session(connect, "heartbeat", self.stop)
        self.round_trip = 0.0  # seconds, measured when the worker starts; the heartbeat's measure after
        self.known_claims = None  # the running pass's claims, as it heard of them (a callable)
        self.started = False

    def new_writer(self):
        """Another write session (its connection opened at its first batch)."""
        return Session(self.connect, "writer", self.stop, forever=self.forever, settings=self.tuning.session_settings)

    def start(self, column, batch_size=None):
        """Measure the round trip, open the sessions a pass needs at that distance, all at once (a
        connection costs a few round trips), write the heartbeat row and start its thread (once)."""
        if self.started:
            return
        self.round_trip = self.control.round_trip_ms(times=3) / 1000
        self.heartbeat.round_trip_ms = self.round_trip * 1000
        rows = batch_size or 1000
        while len(self.writers) < writers_needed(self.tuning, self.round_trip, SERVER_SECONDS_PER_ROW * rows):
            self.writers.append(self.new_writer())
        opening = [threading.Thread(target=_open_quietly, args=(session,), daemon=True)
                   for session in (self.reader, self.beat_session, *self.writers)]
        if self.throttle is not None:  # its connection too: the first batch waits only for its first look
            opening.append(threading.Thread(target=self.throttle.open_quietly, daemon=True))
        for thread in opening:
            thread.start()
        self.control.query(self.heartbeat.start_sql(self.control, column, not self.control.pooled))
        for thread in opening:
            thread.join()  # a connection that failed is opened again, with retries, at its first use
        self.heartbeat.run_in_background(self.beat_session)
        self.started = True

    def measured_round_trip(self):
        """Seconds: the heartbeat's latest measure, or the one taken at the start."""
        measured = self.heartbeat.round_trip_ms
        return self.round_trip if measured is None else measured / 1000

    def close(self):
        """Mark the run finished and close the sessions."""
        self.heartbeat.stop_background()
        try:
            if self.started:
                self.heartbeat.finish(self.control)
        except BackfillError as exc:
            logger.warning("could not mark the worker finished: %s", exc)
        finally:
            for session in (self.reader, *self.writers, self.control, self.beat_session):
                session.close()
            if self.throttle is not None:
                self.throttle.close()

    def column_now(self, column, recorded):
        """The column holding this worker's model now: `column`, or its name after a swap or an undo;
        None when another model's vectors are recorded there and this model has no column (`recorded`:
        the ledger's entries)."""
        for entry in recorded.values():
            if ledger.same_model(self.identity, entry.identity)[0] and entry.source != "simulated":
                return entry.column
        return None if column in recorded else column

    def _adopt_claims(self, cursor):
        """After a reconnect: the claims a lost answer made are released (the worker never heard of them),
        and those in flight name the new session (else, on a direct connection, they would look dead
        to other workers)."""
        known = self.known_claims() if self.known_claims is not None else []
        cursor.execute(sql.DROP_UNHEARD_CLAIMS, [str(self.heartbeat.id), list(known)])
        cursor.execute(sql.ADOPT_CLAIMS, [str(self.heartbeat.id)])


def _open_quietly(session):
    """Open `session`'s connection ahead of its first use; a failure waits for that use, which reports it."""
    try:
        session.connection()
    except Exception as exc:  # reported, with its retries and its fix, by the session's first step
        logger.debug("opening the %s session ahead failed: %s", session.role, exc)


class _NotAhead(Exception):
    """Takes back a message sent ahead of its batch (Run._write_ahead): the batch, if any, goes the plain way."""


class Run:
    """One pass of a worker over the pending segments of `target` (see the module docstring).

    `wait_for_arrivals(stop)`, when given (the follower), makes the pass go on after the last
    pending segment: its claim stage waits for the next arrival instead of ending, and each burst
    embedded is reported to `on_idle(report)` as the stage goes back to waiting. `on_column(name)`
    hears of each move of the column (a swap or an undo renamed it)."""

    def __init__(self, worker, target, *, batch_size, limit=None, progress=None, retry_quarantined=False,
                 count_blank=True, wait_for_arrivals=None, on_idle=None, on_column=None):
        self.worker, self.target = worker, target
        self.count_blank = count_blank  # a follower's passes leave out the final count's table scan
        self.encoder, self.tuning, self.stop = worker.encoder, worker.tuning, worker.stop
        self.batch_size, self.limit, self.progress = batch_size, limit, progress
        self.retry_quarantined = retry_quarantined
        self.wait_for_arrivals, self.on_idle, self.on_column = wait_for_arrivals, on_idle, on_column
        self.report = BackfillReport(column=target.column)
        self.batch_done = threading.Event()  # set by a write thread after each batch, and on stopping
        self.stages_stop = threading.Event()  # this pass's stages stop (a failure, or the worker stopping)
        self.failures = []
        self.lock = threading.Lock()
        self.open_claims = set()
        self.unhanded = 0  # claimed batches no writer has taken yet
        self.awaited = 0  # of those, batches a writer's message, sent ahead, waits for
        self.coming = threading.Condition(self.lock)  # notified as batches are claimed, and at the encoder's end
        self.encoded_all = False  # the encoder has handed over its last batch
        self.claims_ending = False  # a claim came back short: what is left is in the queue, or nearly
        # room for two claiming round trips' batches: the next claim is on its way while the encoder works
        self.claimed_queue = queue.Queue(max(QUEUE_DEPTH, self.tuning.encode_window,
                                             2 * batches_per_claim(worker.measured_round_trip())))
        self.encoded_queue = queue.Queue(max(QUEUE_DEPTH, self.tuning.writers))
        self.clocks = {"claim": [StageClock()], "encode": [StageClock()], "write": []}
        self.writer_threads = []
        self.server_seconds = SERVER_SECONDS_PER_ROW * batch_size  # a batch's time on the server, measured as it runs
        self.claim_query = sql.claim_message(target.column, retry_quarantined)
        self.vector_writers = {}  # write session: its VectorWriter
        self.ledger_writer = VectorWriter(None, target.column, target.dims, identity=worker.identity,
                                          type_name=target.storage)  # what the pass learns of the ledger, once
        self.ledger_writer.entry_id = target.entry_id  # resolved with the target: each batch's message checks it
        self.ready = threading.Event()  # the pass's counts are in: the writes may go
        self.since = None
        self.horizon = None  # the last id when the pass began: what arrives since and another worker takes is its
        self.total = 0
        self.blank = None  # blank segments, counted as the pass starts
        self.final_counts = None  # (pending, quarantined), when the last claim found nothing open
        self.done = 0
        self.burst = BackfillReport(column=target.column)  # what a follower embedded since it last waited
        self.burst_started = None  # when its first batch was claimed

    @property
    def stopping(self):
        return self.stages_stop.is_set() or self.stop.is_set()

    def execute(self):
        """Run the stages to the end; the BackfillReport, or the first stage's failure."""
        started = time.monotonic()
        self.worker.heartbeat.in_flight = lambda: len(self.open_claims)
        self.worker.known_claims = self._open_claim_ids
        claim = threading.Thread(target=self._guarded, args=(self._claim_stage,), name="backfill-claim")
        setup = threading.Thread(target=self._guarded, args=(self._set_up, claim), name="backfill-setup")
        try:
            # The pass's counts are read beside the first claims and encoding; the writes wait for them.
            setup.start()
            if self.worker.throttle is not None and self.wait_for_arrivals is None:
                self.worker.throttle.look_ahead()  # (a follower's first write may come much later: it looks then)
            if not self.retry_quarantined:
                claim.start()
            self._add_writers(writers_needed(self.tuning, self.worker.round_trip, self.server_seconds))
            try:
                self._guarded(self._encode_stage)
            except BaseException:  # KeyboardInterrupt: stop the other stages too
                self.stages_stop.set()
                raise
            finally:
                setup.join()
                if claim.ident is not None:
                    claim.join()
                for thread in list(self.writer_threads):
                    thread.join()
        finally:
            self.report.seconds = time.monotonic() - started
            self.report.stages = stage_figures(self.clocks, self.report.seconds)
            self.report.limited_by = limiting_stage(self.report.stages)
            self.report.column = self.target.column
            self.report.writers = len(self.writer_threads)
            self.report.round_trip_ms = round(self.worker.measured_round_trip() * 1000, 1)
            self._finish()
            self.worker.heartbeat.in_flight = self.worker.known_claims = None
        if self.failures:
            error = self.failures[0]
            if isinstance(error, BackfillError):
                error.report = self.report
            raise error
        return self.report

    def _set_up(self, claim):
        """The pass's counts (`since`, the total, the blank count, its horizon); then the claims, if they
        waited for `since` (a retry of the quarantine)."""
        try:
            self.since, total, self.blank, horizon = self._following_renames(self.worker.control, self._prepare)
            self.horizon = None if self.wait_for_arrivals is not None else horizon
            self.total = total if self.limit is None else min(total, self.limit)
            self._report_progress()
            if self.retry_quarantined:
                claim.start()  # its claims retry the entries recorded before the pass's start time
        finally:
            self.ready.set()  # a failure has stopped the stages: the writers need not wait

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
            room = self._room(claimed)
            if room <= 0:
                break
            self.batch_done.clear()  # before the claim: a batch written while it is on its way wakes the wait below
            with clock.timing("busy"):
                batches, counts = self._claim_renamed_safely(after, room)
            if batches:
                self.burst_started = self.burst_started or time.monotonic()
                took = sum(len(batch.ids) for batch in batches)
                claimed, after = claimed + took, batches[-1].ids[-1]
                self.claims_ending = took < room and self.wait_for_arrivals is None
                with clock.timing("waiting_for_room"):
                    if not all(self._put(self.claimed_queue, batch) for batch in batches):
                        return
            elif after != BEFORE_FIRST_ID:
                after = BEFORE_FIRST_ID  # once more from the start: texts changed behind the cursor
            elif self.wait_for_arrivals is not None:
                with clock.timing("waiting_for_input"):
                    self._wait_for_arrivals()
            else:
                left, pending, quarantined = counts
                if left == 0:
                    self.final_counts = (pending, quarantined)
                    break
                # The last rows are in batches in flight: this worker's (look again as soon as one
                # of them is written) or another worker's (look again after POLL_SECONDS), of rows that were
                # pending when the pass began (what arrived since and another worker took, a follower,
                # is that worker's to write: waiting for it could last as long as the arrivals do).
                with clock.timing("waiting_for_input"):
                    self.batch_done.wait(POLL_SECONDS)
        self._put(self.claimed_queue, _END)

    def _room(self, claimed):
        """Rows the next claiming round trip takes: batches_per_claim() batches, within the limit."""
        room = self.batch_size * batches_per_claim(self.worker.measured_round_trip())
        return room if self.limit is None else min(room, self.limit - claimed)

    def _wait_for_arrivals(self):
        """(A follower:) report the burst just embedded once it is all written, then wait for the next arrival."""
        while self._open_claim_ids() and not self.stopping:
            self.batch_done.clear()
            self.batch_done.wait(POLL_SECONDS)
        with self.lock:
            burst, self.burst = self.burst, BackfillReport(column=self.target.column)
            burst.column, burst.seconds = self.target.column, time.monotonic() - (self.burst_started or time.monotonic())
            self.burst_started = None
        if burst.rows_embedded or burst.rows_quarantined:
            self.worker.heartbeat.beat_now()
            if self.on_idle is not None:
                self.on_idle(burst)
        self.wait_for_arrivals(self.stop)

    def _claim_renamed_safely(self, after, room):
        return self._following_renames(self.worker.reader, self._claim, after, room)

    def _following_renames(self, session, work, *args):
        """`work(session, *args)`; when a swap or an undo renamed the column since the pass began, the
        column's new name is looked up in the model ledger and the work done again."""
        try:
            return work(session, *args)
        except errors.UndefinedColumn as exc:
            if self.target.column not in (exc.diag.message_primary or ""):
                raise  # another column is missing: not a rename of this pass's column
            column = self.worker.control.run(
                lambda connection, cursor: self.worker.column_now(None, ledger.entries(cursor, TABLE)))
            if column is None:
                raise BackfillError(f"{TABLE}.{self.target.column} is gone, and no column holds "
                                    f"{self.worker.identity.name}'s vectors any more.") from None
            self._moved_to(column)
            return work(session, *args)

    def _moved_to(self, column):
        with self.lock:
            if column == self.target.column:
                return
            logger.info("the column of %s is now %s (was %s)", self.worker.identity.name, column, self.target.column)
            self.target.column = column
            self.claim_query = sql.claim_message(column, self.retry_quarantined)
        if self.on_column is not None:
            self.on_column(column)

    def _encode_stage(self):
        """Windows of claims, as they come, into the encoder's stream (encode.encode_windows): on a GPU the
        device goes from one window to the next without a gap; each window's claims to the writers."""
        clock = self.clocks["encode"][0]
        results = encode_windows(self.encoder, self._windows(clock), self.target.dims)
        while True:
            with clock.timing("busy"):
                encoded = next(results, None)
            if encoded is None:
                break
            with clock.timing("waiting_for_room"):
                if not all(self._put(self.encoded_queue, batch) for batch in encoded):
                    results.close()
                    return
        with self.coming:
            self.encoded_all = True
            self.coming.notify_all()
        self._put(self.encoded_queue, _END)  # each writer passes it on as it ends

    def _windows(self, clock):
        """Each window of claimed batches (_window) until the claim stage ends (read on the stream's thread).
        The pass's first window is one claim: its batch is encoded, and on its way to be written, sooner;
        so are its last ones, once a claim came back short: the pass's last writes follow its last batch,
        not the whole of its last window."""
        size = 1
        while True:
            with clock.timing("waiting_for_input"):
                batches, ended = self._window(size)
            if batches:
                yield batches
            if ended:
                return
            size = 1 if self.claims_ending else self.tuning.encode_window

    def _window(self, size):
        """(up to `size` claimed batches, whether the claim stage has ended): waits for the first, then
        takes only those already queued."""
        first = self._get(self.claimed_queue)
        if first is _END:
            return [], True
        batches = [first]
        while len(batches) < size:
            try:
                batch = self.claimed_queue.get_nowait()
            except queue.Empty:
                break
            if batch is _END:
                return batches, True
            batches.append(batch)
        return batches, False

    def _add_writers(self, wanted):
        """Start write threads (each with a session of its own) until `wanted` run."""
        with self.lock:
            while len(self.writer_threads) < wanted:
                number = len(self.writer_threads)
                if number >= len(self.worker.writers):
                    self.worker.writers.append(self.worker.new_writer())
                clock = StageClock()
                self.clocks["write"].append(clock)
                thread = threading.Thread(target=self._guarded, args=(self._write_stage, self.worker.writers[number], clock),
                                          name=f"backfill-write-{number + 1}")
                self.writer_threads.append(thread)
                self.encoded_queue.maxsize = max(self.encoded_queue.maxsize, len(self.writer_threads))
                thread.start()

    def _write_stage(self, session, clock):
        slow = False  # the last batch kept this writer waiting AHEAD_WAIT_SECONDS or more: it waits for the next
        while True:
            started, written = time.perf_counter(), None
            if not slow and self._may_send_ahead():
                with clock.timing("waiting_for_input"):
                    if not self._await_a_batch():
                        return  # the pass has ended (the batches still coming are awaited by others) or stops
                if not self._wait_until_ready(clock):
                    return
                batch, written = self._write_ahead(session, clock)
                if batch is None:
                    slow = True  # none came in time (or the link failed first): this writer waits for the next
                    continue
            else:
                with clock.timing("waiting_for_input"):
                    batch = self._take()
            slow = time.perf_counter() - started >= AHEAD_WAIT_SECONDS
            if batch is _END:
                self._end_for_the_other_writers()
                return
            if written is None:
                with clock.timing("busy"):
                    batch = checked(batch, self.target.dims)
                written = self._write(session, clock, batch)
                if written is None:
                    return  # stopped
            self._written(session, batch, written)

    def _may_send_ahead(self):
        """Whether this pass's writers send a batch's message before the batch is there (VectorWriter's
        write_ahead: far from the database, the COPY's call for the data crosses the wire while the batch is
        encoded): per Tuning.write_ahead, without a rate cap (the message cannot wait its turn)."""
        wanted = self.tuning.write_ahead
        if wanted is None:
            wanted = self.worker.measured_round_trip() >= AHEAD_ROUND_TRIP_SECONDS
        throttle = self.worker.throttle
        return bool(wanted) and (throttle is None or not throttle.max_rows_per_second)

    def _await_a_batch(self):
        """Wait until a claimed batch is on its way that no writer awaits yet, and await it (count it, under
        the lock: each batch sent ahead for is one that comes); False when none will come (the encoder has
        handed over every batch, and the others await the rest) or the pass stops."""
        with self.coming:
            while not self.stopping:
                if self.unhanded > self.awaited:
                    self.awaited += 1
                    return True
                if self.encoded_all:
                    return False
                self.coming.wait(0.2)
        return False

    def _take(self, within=None):
        """The next encoded batch (_get): None when `within` seconds pass first."""
        item = self._get(self.encoded_queue, within)
        if item is not None and item is not _END:
            with self.lock:
                self.unhanded -= 1
        return item

    def _wait_until_ready(self, clock):
        """Wait for the pass's counts; False when the pass stops meanwhile."""
        with clock.timing("waiting_for_input"):
            while not self.ready.wait(0.2):
                if self.stopping:
                    return False
        return not self.stopping

    def _write(self, session, clock, batch):
        """Write an EncodedBatch (or its quarantine only) in one message, once the pass is ready and the
        throttle lets it; rows written, None when the pass stopped meanwhile."""
        if not self._wait_until_ready(clock):
            return None
        throttle = self.worker.throttle
        if throttle is not None:
            with clock.timing("waiting_for_room"):
                if not throttle.before_write(len(batch.ids) + len(batch.failed), self.stop):
                    return None  # stopped while held back: the claim is released at the end of the pass
        with clock.timing("busy"):
            started = time.perf_counter()
            written = session.write(self._writer(session), (batch.ids, batch.md5s, batch.vectors),
                                    *self._statements(session, batch)) \
                if batch.ids else self._write_failures_only(session, batch)
            self._measured(time.perf_counter() - started, len(batch.ids))
        return written

    def _write_ahead(self, session, clock):
        """Send the message of a batch this writer awaits (_await_a_batch) before the batch is there, and hand
        it the next encoded batch when the server asks for the data: (the batch, rows written). (the batch,
        None) when the message was taken back and the batch is to be written the plain way (it has rows to
        quarantine, or none to write, or the throttle would hold it, or the link failed once it was handed
        over); (None, None) when none came within AHEAD_WAIT_SECONDS, or the link failed before."""
        taken, handed_at, asked = [], [], []

        def next_batch():
            asked.append(True)
            try:
                with clock.timing("waiting_for_input"):
                    item = self._take(within=AHEAD_WAIT_SECONDS)
            finally:
                with self.lock:
                    self.awaited -= 1
            if item is None:
                raise _NotAhead("no batch in time")
            taken.append(item)
            if item is _END:
                self._end_for_the_other_writers()  # at once: the others need not wait for this message's end
                raise _NotAhead("the pass's end")
            with clock.timing("busy"):
                batch = taken[0] = checked(item, self.target.dims)
            throttle = self.worker.throttle
            if batch.failed or not batch.ids or self.stopping or not (throttle is None
                                                                      or throttle.goes_now(len(batch.ids))):
                raise _NotAhead("a batch for a message of its own")
            handed_at.append(time.perf_counter())
            return batch.ids, batch.md5s, batch.vectors

        try:
            written = session.write_ahead(self._writer(session), next_batch, self.batch_size,
                                          *self._ahead_statements(session))
        except _NotAhead:
            return (taken[0] if taken else None), None
        except Exception as exc:
            if not (isinstance(exc, TRANSIENT_ERRORS) or ledger_moved(exc)):
                raise
            if ledger_moved(exc):  # a swap or an undo renamed the column: the plain write follows it
                logger.info("the column moved under a message sent ahead of its batch; the batch follows it")
            else:
                logger.warning("the backfill %s failed (a message sent ahead of its batch): %s; retrying with the "
                               "batch in a message of its own", session.role, " ".join(str(exc).split()))
            return (taken[0] if taken else None), None
        finally:
            if not asked:  # the message failed before the server asked for the batch
                with self.lock:
                    self.awaited -= 1
        seconds = time.perf_counter() - handed_at[0]
        clock.busy += seconds
        self._measured(seconds + self.worker.measured_round_trip(), len(taken[0].ids))  # as if sent then: two trips
        return taken[0], written

    def _written(self, session, batch, written):
        """A batch's message has committed: the pass's counts, its claim, the heartbeat, the claim stage's wait."""
        self._moved_to(self.vector_writers[session].column if batch.ids else self.target.column)
        self.worker.heartbeat.batch(len(batch.ids) + len(batch.failed), self.target.column)
        with self.lock:
            self.open_claims.discard(batch.claim_id)
            for report in (self.report, self.burst):
                report.batches += 1
                report.rows_embedded += written
                report.rows_stale += len(batch.ids) - written
                report.rows_quarantined += len(batch.failed)
            self.done += len(batch.ids) + len(batch.failed)
            self._report_progress()
        for segment_id, _, reason in batch.failed:
            logger.warning("segment %s quarantined: %s", segment_id, reason)
        self.batch_done.set()

    def _end_for_the_other_writers(self):
        try:
            self.encoded_queue.put_nowait(_END)
        except queue.Full:
            pass  # a writer's batch came after the end: cannot be (the queue is in order)

    def _measured(self, seconds, rows):
        """Learn a batch's server time (its write less two round trips), and start more write sessions
        when the link needs them (writers_needed)."""
        if rows < self.batch_size // 2:
            return  # a small batch says little of a full one's
        server = max(0.0, seconds - 2 * self.worker.measured_round_trip())
        self.server_seconds = 0.8 * self.server_seconds + 0.2 * server
        wanted = writers_needed(self.tuning, self.worker.measured_round_trip(), self.server_seconds)
        if wanted > len(self.writer_threads):
            self._add_writers(wanted)

    def _put(self, target, item):
        while not self.stopping:
            try:
                target.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, source, within=None):
        """The next item of `source`; _END when the pass stops meanwhile; None when `within` seconds pass first."""
        until = None if within is None else time.monotonic() + within
        while True:
            try:
                return source.get(timeout=0.2 if until is None else max(0.0, min(0.2, until - time.monotonic())))
            except queue.Empty:
                if self.stopping:
                    return _END
                if until is not None and time.monotonic() >= until:
                    return None

    def _report_progress(self):
        """Call `progress(done, total)`; the write threads call it holding the lock, in order."""
        if self.progress is not None:
            self.total = max(self.total, self.done)
            self.progress(self.done, self.total)

    def _open_claim_ids(self):
        with self.lock:
            return sorted(self.open_claims)

    # The steps, one message each.

    def _prepare(self, session):
        return tuple(session.query(sql.prepare_message(self.target.column, self.count_blank))[0])

    def _claim(self, session, after, limit):
        """Claim up to `limit` rows after id `after`, cut into claims of batch_size rows, in one round trip:
        (a ClaimedBatch per claim, None); ([], (open, pending, quarantined)) when nothing was taken."""
        rows = session.query(self.claim_query, {
            "key": sql.CLAIM_LOCK_KEY, "after": after, "limit": limit, "since": self.since, "batch": self.batch_size,
            "name": worker_name(), "worker": str(self.worker.heartbeat.id), "lease": LEASE_SECONDS,
            "session": not session.pooled, "horizon": self.horizon})
        if rows and rows[0][0] is None:
            return [], tuple(rows[0][4:])
        batches = {}
        for segment_id, text, md5, claim_id, *_counts in rows:
            batch = batches.setdefault(claim_id, ClaimedBatch(claim_id, [], [], []))
            batch.ids.append(segment_id)
            batch.texts.append(text)
            batch.md5s.append(md5)
        with self.coming:
            self.open_claims.update(batches)
            self.unhanded += len(batches)
            self.coming.notify_all()
        return sorted(batches.values(), key=lambda batch: batch.ids[0]), None

    def _writer(self, session):
        """The session's VectorWriter (one each: it keeps what it learnt of the model ledger)."""
        writer = self.vector_writers.get(session)
        if writer is None:
            writer = self.vector_writers[session] = VectorWriter(
                None, self.target.column, self.target.dims, identity=self.worker.identity,
                type_name=self.target.storage)  # the target's type: no catalogue read a batch
            writer.follow(self.ledger_writer)
        return writer

    def _ahead_statements(self, session):
        """(before, after) the COPY of a message sent ahead of its batch, which cannot name the batch: the
        claim whose first row is the first row staged ended (a batch sent ahead has every row of its claim),
        after the COPY the quarantine entries of the rows written dropped."""
        staging = self._writer(session).staging_table
        before = [session.mogrify(sql.delete_staged_claim_sql(staging), [str(self.worker.heartbeat.id)])]
        return before, [sql.unquarantine_staged_sql(staging) % self.batch_size]

    def _statements(self, session, batch):
        """(before, after) the COPY of a batch's message: its quarantine, its claim's end and the
        heartbeat's count; after the COPY, the quarantine entries of the rows written dropped."""
        before = [*self._quarantine_sql(session, batch), session.mogrify(sql.DELETE_CLAIM, [batch.claim_id])]
        after = [sql.unquarantine_staged_sql(self._writer(session).staging_table) % len(batch.ids)]
        return before, after

    def _quarantine_sql(self, session, batch):
        if not batch.failed:
            return []
        ids, md5s, reasons = zip(*batch.failed)
        return [session.mogrify(sql.QUARANTINE, [list(ids), [str(m) for m in md5s], list(reasons)])]

    def _write_failures_only(self, session, batch):
        """A batch with no vector to write (every text failed): its quarantine and its claim's end, one message."""
        before, _after = self._statements(session, batch)
        session.query("; ".join(before))
        return 0

    def _finish(self):
        """Count what remains (as the last claim said it, or, with claims left over, releasing them)."""
        leftover = self._open_claim_ids()
        if self.final_counts is not None and not leftover:
            self.report.rows_remaining, self.report.rows_in_quarantine = self.final_counts
            self.report.rows_blank = self.blank
            return
        try:
            self.report.rows_remaining, self.report.rows_in_quarantine, self.report.rows_blank = (
                self._following_renames(self.worker.control, lambda session: count_plan(
                    session, self.target.column, self.count_blank, leftover)))
        except BackfillError as exc:
            logger.warning("could not count the remaining rows: %s", exc)
