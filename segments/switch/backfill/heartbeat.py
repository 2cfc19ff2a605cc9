"""Each worker's heartbeat: one row of `segments_backfill_worker` per worker run, and the leases of
its claims.

A thread of the worker (with a database session of its own) writes the row every BEAT_SECONDS:
`updated`, the mode, the model, the column it writes now, its rate over the last minute; and in
the same transaction pushes its claims' leases LEASE_SECONDS ahead. The write stage adds each
batch's rows in the batch's own transaction, so `rows_done` is exactly what was committed (a
batch rolled back and retried is counted once). `embedding_status` and the admin read the rows
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

from .report import BackfillError
from .session import worker_name

logger = logging.getLogger(__package__)

BEAT_SECONDS = 2.0  # how often the heartbeat thread writes
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
        recent_rows_per_s = %(rate)s
    WHERE id = %(id)s
"""
RENEW_CLAIMS = ("UPDATE embeddings_backfill_claim SET expires_at = now() + %s * interval '1 second' "
                "WHERE worker_id = %s")
BATCH = """
    UPDATE segments_backfill_worker SET rows_done = rows_done + %(rows)s, updated = clock_timestamp(),
        last_batch_at = clock_timestamp(), last_batch_rows = %(rows)s, "column" = %(column)s
    WHERE id = %(id)s
"""
FINISH = "UPDATE segments_backfill_worker SET finished = clock_timestamp() WHERE id = %s"
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

    def __init__(self, encoder, mode="backfill", model_name=""):
        self.id = uuid.uuid4()
        self.encoder = encoder
        self.name = worker_name()
        self.mode, self.model_name = mode, model_name
        self.column = ""
        self._recent = collections.deque()  # (monotonic time, rows) of the last RATE_WINDOW_SECONDS
        self._lock = threading.Lock()
        self._thread = None
        self._stopping = threading.Event()

    def start(self, cursor, column, session_identifies):
        """Insert the row (`session_identifies`: the session's pid means something, no pooler)."""
        self.column = column or ""
        cursor.execute(START, {"id": str(self.id), "name": self.name, "session": session_identifies,
                               "device": device_of(self.encoder), "mode": self.mode, "model": self.model_name,
                               "column": self.column})

    def batch(self, cursor, rows, column):
        """Add a batch's `rows`, in the batch's transaction."""
        self.column = column
        cursor.execute(BATCH, {"id": str(self.id), "rows": rows, "column": column})
        with self._lock:
            self._recent.append((time.monotonic(), rows))

    def rate(self):
        """Rows a second over the last minute (None before the first batch)."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()
            if not self._recent:
                return None
            return round(sum(rows for _, rows in self._recent) / RATE_WINDOW_SECONDS, 2)

    def tick(self, connection, cursor):
        """Renew the worker's claims and say it is alive (a Session.run work function): claims first,
        then the worker's row, the order a batch's transaction locks them in (no deadlock)."""
        cursor.execute(RENEW_CLAIMS, [LEASE_SECONDS, str(self.id)])
        cursor.execute(TICK, {"id": str(self.id), "mode": self.mode, "column": self.column, "rate": self.rate()})

    def finish(self, cursor):
        """Mark the run finished, and forget runs that ended more than KEEP_DAYS ago."""
        cursor.execute(FINISH, [str(self.id)])
        cursor.execute(FORGET_OLD)

    def run_in_background(self, session):
        """Tick every BEAT_SECONDS in a daemon thread, on `session`, until `stop_background()`."""
        def beat():
            while not self._stopping.wait(BEAT_SECONDS):
                try:
                    session.run(self.tick)
                except BackfillError as exc:  # the database is away: the next tick tries again
                    logger.warning("heartbeat of %s missed: %s", self.name, exc)

        self._thread = threading.Thread(target=beat, name="backfill-heartbeat", daemon=True)
        self._thread.start()

    def stop_background(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
