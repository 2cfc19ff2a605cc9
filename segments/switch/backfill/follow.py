"""`backfill_embeddings --follow`: the backfill engine, long-running, so that every segment is
searchable within a second of its commit, at every phase of a switch and after it.

It runs one long pass (pipeline.Run) that does not end when nothing is pending: its claim stage
waits for the next arrival and claims it at once, with one Worker kept for its whole life (the
model loaded once, the database sessions open, the heartbeat running). From an arrival's NOTIFY to
its vector's commit it costs three round trips (a claim, then the batch's message: askdrchaffee/
round_trips.py), so that a follower far from its database stays within a fraction of a second:

- **Woken at once** by `NOTIFY segments_embedding`, which the table's arrival trigger sends when a
  segment is inserted or its text changes (segments/triggers.py), on a connection of its own that
  LISTENs. `LISTEN` does not survive a pooler in transaction mode: behind one, without
  DATABASE_DIRECT_URL, it looks every FOLLOW_POLL_SECONDS instead, and says so. It also looks that
  often while listening, in case a notification was missed.
- **Phase-aware**: before each pass it asks the model ledger which column holds its model's
  vectors (the next column before the swap, `embedding` after it, the next column again after an
  undo), and each batch checks again inside its own transaction (embeddings/writer.py). It never
  holds a lock the swap waits for beyond one batch's transaction. A model with no column (the
  table not expanded yet, or its column contracted away) waits, saying why once.
- **Robust**: its sessions retry without end, with backoff (one log line per failure, no
  traceback), through a database restart; SIGTERM or SIGINT ends the pass (a batch is written
  whole or not at all) and it exits within STOP_SECONDS; a follower killed outright leaves claims
  that die with its session or their lease (heartbeat.py); several followers share the arrivals
  through the claims, each row embedded once.
- **Visible**: its heartbeat row says host:pid, mode (listen or poll), model, column, device, last
  batch and rows/s (`embedding_status`, the admin).
- **Gentle in a burst, never late for an arrival**: a batch of at most FREE_ROWS rows (what arrived
  since the last one, at the application's own pace) is written at once, whatever the database's
  health: it adds little WAL next to the application's own writes, and holding it back would leave
  new and edited segments unsearchable, which an operator pausing the switch does not want. A larger
  batch (a burst: an import, a mass edit, the catch-up after the follower was down) waits like the
  backfill's, while `embedding_switch pause` is in force, while a replica lags more than
  BACKFILL_MAX_REPLICA_LAG, and under --max-rows-per-second (segments/switch/throttle.py).

Between passes it clears, a few thousand at a time, the `segments_pending_since` entries of
segments that have their vectors.
"""
import logging
import select
import threading
import time

import psycopg2
from psycopg2 import errors

from askdrchaffee import postgres
from embeddings import ledger
from segments import triggers
from segments.schema import TABLE, SchemaNotReady, pending_sql, vector_column_types
from segments.switch import throttle

from .pipeline import Run, Worker
from .report import BackfillError
from .session import connector

logger = logging.getLogger(__package__)

STOP_SECONDS = 4.0  # after a stop request, the longest the follower waits for its pass to end
FREE_ROWS = 100  # a batch of at most this many rows is written whatever the database's health
CLEANUP_SECONDS = 60.0  # how often the pending_since entries of embedded segments are cleared
CLEANUP_ROWS = 5000
RECONNECT_SECONDS = 5.0  # how often a lost listening connection is tried again


class Listener:
    """A connection of its own that LISTENs on the arrival channel (None of it behind a pooler)."""

    def __init__(self, using):
        self.using = using
        self.connection = None
        self.why_not = None
        self._next_try = 0.0
        self._connect()

    def _connect(self):
        try:
            self.connection = postgres.private_connection(self.using, "LISTEN", application_name="backfill_embeddings "
                                                          "follow listener")
            with self.connection.cursor() as cursor:
                cursor.execute(f"LISTEN {triggers.CHANNEL}")
            self.why_not = None
        except postgres.PoolerRefused as exc:
            self.connection, self.why_not = None, "DATABASE_URL goes through a pooler (set DATABASE_DIRECT_URL to LISTEN)"
            self._next_try = float("inf")  # a pooler stays one: poll for good
            logger.info("cannot LISTEN: %s", exc)
        except psycopg2.Error as exc:
            if postgres.connection_refusal(exc):
                raise  # a setting to fix (DATABASE_DIRECT_URL's, say): the command says which
            self.connection, self._next_try = None, time.monotonic() + RECONNECT_SECONDS
            self.why_not = f"the listening connection failed ({' '.join(str(exc).split())})"

    @property
    def listening(self):
        return self.connection is not None

    def wait(self, seconds, stop):
        """Return when a notification arrives, `seconds` pass, or `stop` is set."""
        if self.connection is None:
            if time.monotonic() >= self._next_try:
                self._connect()
            if self.connection is None:
                stop.wait(seconds)
                return
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                ready, _, _ = select.select([self.connection], [], [], min(0.25, deadline - time.monotonic()))
                if ready:
                    self.connection.poll()
                    if self.connection.notifies:
                        self.connection.notifies.clear()
                        return
            except (OSError, psycopg2.Error) as exc:
                logger.warning("the listening connection was lost (%s); polling until it is back",
                               " ".join(str(exc).split()))
                self.close()
                self.why_not, self._next_try = "the listening connection was lost", time.monotonic() + RECONNECT_SECONDS
                return

    def close(self):
        if self.connection is not None:
            try:
                self.connection.close()
            except psycopg2.Error:
                pass
            self.connection = None


class Follower:
    """One `backfill_embeddings --follow` process: passes whenever segments arrive (module docstring).

    `say(line)` reports each event on one line (the command's output). `stop` ends it.
    """

    def __init__(self, encoder, *, using="default", connect=None, batch_size, tuning=None, poll_seconds,
                 say=None, stop=None, max_rows_per_second=None, max_replica_lag=throttle.SETTING):
        self.encoder, self.using = encoder, using
        self.connect = connect or connector(using)
        self.batch_size, self.tuning, self.poll_seconds = batch_size, tuning, poll_seconds
        self.say = say or (lambda line: None)
        self.limits = {"max_rows_per_second": max_rows_per_second, "max_replica_lag": max_replica_lag}
        self.stop = stop or threading.Event()
        self.worker = None
        self.listener = None
        self._waiting_for = None
        self._writing = None
        self._last_cleanup = 0.0

    @property
    def mode(self):
        if self.listener is not None and self.listener.listening:
            return "follow (listen)"
        return f"follow (poll every {self.poll_seconds:g} s)"

    def run(self):
        """Follow until stopped."""
        self.listener = Listener(self.using)
        if not self._wait_for_phase_1():
            self.listener.close()
            return
        catch_up = throttle.Throttle(self.connect, free_rows=FREE_ROWS, say=self.say, what="the follower's catch-up",
                                     **self.limits)
        self.worker = Worker(self.encoder, self.connect, self.tuning, mode=self.mode, stop=self.stop, forever=True,
                             throttle=catch_up)
        try:
            self.worker.start(None, self.batch_size)
            self.say(self._started())
            while not self.stop.is_set():
                self.worker.heartbeat.mode = self.mode
                try:
                    target = self._target()
                    if target is not None:
                        self._follow(target)
                except errors.UndefinedColumn as exc:  # a swap or an undo renamed a column meanwhile
                    logger.info("columns renamed under the follower (%s); it looks again", exc.diag.message_primary)
                    self.stop.wait(0.1)  # at once, but never in a tight loop
                    continue
                self.listener.wait(self.poll_seconds, self.stop)
        finally:
            self.listener.close()
            self.worker.close()

    def _wait_for_phase_1(self):
        """Wait, saying why once, until the table has what a follower needs (migration 0009: the arrival
        trigger and the workers' bookkeeping), as a follower started before a deploy's `migrate` must;
        False when stopped meanwhile."""
        said = None
        while not self.stop.is_set():
            try:
                missing = self._missing()
            except psycopg2.OperationalError as exc:  # the database is not there yet either
                if postgres.connection_refusal(exc):
                    raise  # a setting to fix, not a database to wait for: the command says which
                missing = f"the database cannot be reached ({str(exc).strip().splitlines()[0]})"
            if missing is None:
                return True
            if missing != said:
                self.say(f"Waiting: {missing}.")
                said = missing
            self.stop.wait(self.poll_seconds)
        return False

    def _missing(self):
        """What the table lacks for a follower (None: nothing)."""
        connection = self.connect("follow check")
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT to_regclass(%s) IS NOT NULL, to_regclass('segments_pending_since') IS NOT NULL",
                               [TABLE])
                table, arrival = cursor.fetchone()
        finally:
            connection.close()
        if not table:
            return f"there is no {TABLE} table yet: run `python manage.py migrate`"
        if not arrival:
            return (f"{TABLE} has no arrival trigger yet (phase 1, migration segments.0009): run "
                    "`python manage.py migrate`")
        return None

    def _started(self):
        identity = self.worker.identity
        how = ("woken by NOTIFY segments_embedding" if self.listener.listening else
               f"polling every {self.poll_seconds:g} s: {self.listener.why_not}")
        return (f"Following: {identity} on {getattr(self.encoder, 'device', None) or 'its device'}, {how}, "
                f"heartbeat {self.worker.heartbeat.name}.")

    def _target(self):
        """The Target of this pass, or None (said once) while the model has no column to write."""
        try:
            target = self.worker.control.run(self._resolve)
        except (ledger.ModelMismatch, postgres.PoolerRefused) as exc:
            target, reason = None, str(exc)
        except SchemaNotReady as exc:  # no table or no column for the new model yet
            target, reason = None, str(exc)
        else:
            reason = None
        if reason is not None and reason != self._waiting_for:
            self.say(f"Waiting: {reason}")
        if target is not None and target.column != self._writing:
            self.say(f"Writing segments.{target.column}.")
        self._waiting_for, self._writing = reason, target.column if target is not None else None
        return target

    def _resolve(self, connection, cursor):
        from . import target_for

        target = target_for(cursor, self.worker, "this follower")
        self.worker.heartbeat.column = target.column
        return target

    def _follow(self, target):
        """Embed what `target`'s column lacks, then each arrival as it comes, until stopped, or until the
        model's column goes (the contract) or the pass fails: then the caller looks for its column again."""
        run = Run(self.worker, target, batch_size=self.batch_size, count_blank=False,
                  wait_for_arrivals=self._wait_for_arrivals, on_idle=self._embedded, on_column=self._writing_to)
        try:
            run.execute()
        except BackfillError as exc:
            if not self.stop.is_set():
                self.say(f"Pass stopped: {exc}")
        except ledger.ModelMismatch as exc:
            self.say(f"Pass stopped: {exc}")

    def _wait_for_arrivals(self, stop):
        """Between bursts: the cleanup when it is due, then wait for a NOTIFY (or the poll interval)."""
        self._cleanup()
        self.worker.heartbeat.mode = self.mode
        self.listener.wait(self.poll_seconds, stop)

    def _writing_to(self, column):
        """Say so when the model's column moves under the running pass (a swap, an undo)."""
        if column != self._writing:
            self.say(f"Writing segments.{column}.")
            self._writing = column
            self.worker.heartbeat.column = column

    def _embedded(self, burst):
        self.say(f"Embedded {burst.rows_embedded} segment(s) into segments.{burst.column} in {burst.seconds:.2f} s"
                 + (f", quarantined {burst.rows_quarantined}" if burst.rows_quarantined else "") + ".")

    def _cleanup(self):
        """Clear the pending_since entries of segments that are gone, blank or have their vectors."""
        if time.monotonic() - self._last_cleanup < CLEANUP_SECONDS:
            return
        self._last_cleanup = time.monotonic()
        self.worker.control.run(lambda connection, cursor: cursor.execute(cleanup_sql(cursor), [CLEANUP_ROWS]))


def cleanup_sql(cursor):
    """DELETE of up to %s pending_since entries that no longer wait: their segment is gone, blank, or
    has a vector in every column whose model the ledger records as written here."""
    columns = [column for column, entry in ledger.entries(cursor, TABLE).items()
               if entry.source not in ("declared", "simulated") and column in vector_column_types(cursor=cursor)]
    waiting = " OR ".join(f"({pending_sql(column)})" for column in columns) or "false"
    return f"""
        DELETE FROM segments_pending_since p WHERE p.segment_id IN (
            SELECT p2.segment_id FROM segments_pending_since p2 LEFT JOIN {TABLE} s ON s.id = p2.segment_id
            WHERE s.id IS NULL OR NOT ({waiting}) LIMIT %s)
    """


def run_until_stopped(follower, stop):
    """Run `follower` in a thread until it fails or `stop` is set (by the caller's signal handlers), then
    give its pass up to STOP_SECONDS to end; (the exception it failed with or None, whether it ended)."""
    failure = []

    def run():
        try:
            follower.run()
        except BaseException as exc:  # the caller reports it
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=run, name="follower", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.is_set():
        thread.join(0.2)
    thread.join(STOP_SECONDS)
    return (failure[0] if failure else None), not thread.is_alive()
