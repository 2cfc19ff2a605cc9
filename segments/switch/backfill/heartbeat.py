"""Each worker's heartbeat: one row of `segments_backfill_worker` per worker run, and the leases of
its claims.

A thread of the worker (with a database session of its own) writes the row every BEAT_SECONDS:
`updated`, the mode, the model, the column it writes now, its rate over the last minute, its round
trip to the database (the best of its last few beats' `SELECT 1`), its batches in
flight, and why it holds its writes back if it does (the throttle's `waiting_for`); and in the
same message pushes its claims' leases LEASE_SECONDS ahead. The write stage adds each
batch's rows as its message is answered (its commit), and the next beat writes them: `rows_done`
is what was committed, at most BEAT_SECONDS late (a batch rolled back and retried is counted once).
No batch's message touches the worker's row: several write sessions updating one row would each
wait for the others' commits. `embedding_status` and the admin read the rows
of the workers alive: those not finished whose `updated` is within LEASE_SECONDS. When a worker
dies, its row stops moving and its claims' leases run out: other workers take them over (at once
when the claiming database session is gone, on a direct connection; behind a pooler, after the
lease).
"""
import collections
import logging
import threading
import time
import uuid

import psycopg2

from .report import BackfillError
from .session import worker_name

logger = logging.getLogger(__package__)

BEAT_SECONDS = 2.0  # how often the heartbeat thread writes
SOONEST_BEAT_SECONDS = 0.5  # after a batch it writes at once, but never more often than this
LEASE_SECONDS = 20  # a claim, or a worker, not renewed for this long is dead
RATE_WINDOW_SECONDS = 60.0
KEEP_DAYS = 7  # rows of runs that ended longer ago than this are deleted by the next run's end

START = """
    INSERT INTO segments_backfill_worker AS w (id, worker_name, pid, backend_start, device, rows_done, started,
        updated, finished, mode, model_name, "column")
    SELECT %(id)s, %(name)s, CASE WHEN %(session)s THEN a.pid END, CASE WHEN %(session)s THEN a.backend_start END,
           %(device)s, 0, clock_timestamp(), clock_timestamp(), NULL, %(mode)s, %(model)s, %(column)s
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
    ON CONFLICT (id) DO UPDATE SET updated = EXCLUDED.updated, finished = NULL
"""
TICK = """
    UPDATE segments_backfill_worker SET updated = clock_timestamp(), mode = %(mode)s, "column" = %(column)s,
        recent_rows_per_s = %(rate)s, round_trip_ms = %(round_trip_ms)s, batches_in_flight = %(in_flight)s,
        waiting_for = %(waiting_for)s, rows_done = %(done)s,
        last_batch_at = coalesce(now() - %(batch_age)s * interval '1 second', last_batch_at),
        last_batch_rows = coalesce(%(batch_rows)s, last_batch_rows)
    WHERE id = %(id)s
"""
ROUND_TRIP_SAMPLES = 5  # the round trip is the best of this many beats
RENEW_CLAIMS = ("UPDATE embeddings_backfill_claim SET expires_at = now() + %(lease)s * interval '1 second' "
                "WHERE worker_id = %(id)s")
FINISH = "UPDATE segments_backfill_worker SET finished = clock_timestamp(), rows_done = %(done)s WHERE id = %(id)s"
FORGET_OLD = f"""
    DELETE FROM segments_backfill_worker w
    WHERE w.updated < now() - interval '{KEEP_DAYS} days'
"""
ALIVE = f"w.finished IS NULL AND w.updated > now() - interval '{LEASE_SECONDS} seconds'"


def device_of(encoder):
    """Where `encoder` runs ("cuda:0", "cpu"), or None when it does not say (a test encoder)."""
    device = getattr(encoder, "device", None)
    return None if device is None else str(device)[:40]


class Heartbeat:
    """One worker run's row and its claims' leases; `start`, `batch` and `finish` run in the caller's
    transaction, the thread (`run_in_background`) in its own session."""

    def __init__(self, encoder, mode="backfill", model_name="", throttle=None):
        self.id = uuid.uuid4()
        self.encoder = encoder
        self.name = worker_name()
        self.mode, self.model_name = mode, model_name
        self.throttle = throttle
        self.column = ""
        self.round_trip_ms = None  # measured by the worker at its start, then by each beat
        self.in_flight = None  # a callable: the batches the worker's pass has claimed and not written yet
        self._beats = collections.deque(maxlen=ROUND_TRIP_SAMPLES)  # the last beats' durations, ms
        self.rows_done = 0
        self._last_batch = None  # (monotonic time, rows)
        self._recent = collections.deque()  # (monotonic time, rows) of the last RATE_WINDOW_SECONDS
        self._lock = threading.Lock()
        self._thread = None
        self._stopping = threading.Event()
        self._now = threading.Event()  # beat at once (a follower going idle: the status then says what it did)

    def start_sql(self, session, column, session_identifies):
        """The statement inserting the row (`session_identifies`: the session's pid means something, no
        pooler), for a message on `session`."""
        self.column = column or ""
        return session.mogrify(START, {"id": str(self.id), "name": self.name, "session": session_identifies,
                                       "device": device_of(self.encoder), "mode": self.mode,
                                       "model": self.model_name, "column": self.column})

    def batch(self, rows, column):
        """Count a batch's `rows`, committed into `column`; the next beat writes them."""
        self.column = column
        with self._lock:
            self._recent.append((time.monotonic(), rows))
            self.rows_done += rows
            self._last_batch = (time.monotonic(), rows)
        self._now.set()

    def rate(self):
        """Rows a second over the last minute (None before the first batch)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()
            if not self._recent:
                return None
            return round(sum(rows for _, rows in self._recent) / RATE_WINDOW_SECONDS, 2)

    def tick(self, session):
        """Renew the worker's claims and say it is alive, in one message on `session`: claims first, then
        the worker's row, the order a batch's transaction locks them in (no deadlock). A `SELECT 1`
        before it measures the round trip (the tick itself may wait for a batch's row lock)."""
        in_flight = self.in_flight() if self.in_flight is not None else None
        waiting_for = self.throttle.waiting_for if self.throttle is not None else ""
        self._beats.append(session.round_trip_ms())
        self.round_trip_ms = round(min(self._beats), 1)
        with self._lock:
            done, last = self.rows_done, self._last_batch
        session.query(f"{RENEW_CLAIMS}; {TICK}", {
            "lease": LEASE_SECONDS, "id": str(self.id), "mode": self.mode, "column": self.column, "rate": self.rate(),
            "round_trip_ms": self.round_trip_ms, "in_flight": in_flight, "waiting_for": waiting_for[:300],
            "done": done, "batch_age": None if last is None else time.monotonic() - last[0],
            "batch_rows": None if last is None else last[1]})

    def finish(self, session):
        """Mark the run finished, and forget runs that ended more than KEEP_DAYS ago: one message."""
        with self._lock:
            done = self.rows_done
        session.query(f"{FINISH}; {FORGET_OLD}", {"id": str(self.id), "done": done})

    def run_in_background(self, session):
        """Tick every BEAT_SECONDS in a daemon thread, on `session`, until `stop_background()`."""
        def beat():
            while not self._stopping.is_set():
                self._now.wait(BEAT_SECONDS)
                if self._stopping.wait(SOONEST_BEAT_SECONDS if self._now.is_set() else 0):
                    break
                self._now.clear()
                try:
                    self.tick(session)
                except (BackfillError, psycopg2.Error) as exc:  # the database is away, or refuses: the next beat tries
                    logger.warning("heartbeat of %s missed: %s", self.name, exc)

        self._thread = threading.Thread(target=beat, name="backfill-heartbeat", daemon=True)
        self._thread.start()

    def beat_now(self):
        """Have the background thread beat at once rather than at its next BEAT_SECONDS."""
        self._now.set()

    def stop_background(self):
        self._stopping.set()
        self._now.set()
        if self._thread is not None:
            self._thread.join()
