"""Each backfill worker's heartbeat: one row of `segments_backfill_worker` per worker run.

The write stage records it in the same transaction as each batch, so `rows_done` is exactly
what was committed (a batch rolled back and retried is counted once), and the run marks it
finished at its end. `embedding_status` and the admin read it for each worker's device, rows/s
and the ETA. The row names the writer's database session (pid, backend start, as in
pg_stat_activity): when that session is gone without `finished`, the worker died.
"""
import uuid

from .session import worker_name

KEEP_DAYS = 7  # rows of runs that ended longer ago than this are deleted by the next run's end

BEAT = """
    INSERT INTO segments_backfill_worker AS w
        (id, worker_name, pid, backend_start, device, rows_done, started, updated, finished)
    SELECT %(id)s, %(name)s, a.pid, a.backend_start, %(device)s, %(rows)s, %(started)s, clock_timestamp(), NULL
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
    ON CONFLICT (id) DO UPDATE SET rows_done = w.rows_done + EXCLUDED.rows_done, updated = EXCLUDED.updated,
        pid = EXCLUDED.pid, backend_start = EXCLUDED.backend_start, device = EXCLUDED.device
"""
FINISH = "UPDATE segments_backfill_worker SET finished = clock_timestamp() WHERE id = %s"
FORGET_OLD = f"""
    DELETE FROM segments_backfill_worker w
    WHERE w.updated < now() - interval '{KEEP_DAYS} days'
      AND (w.finished IS NOT NULL OR NOT EXISTS (
          SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.pid AND a.backend_start = w.backend_start))
"""


def device_of(encoder):
    """Where `encoder` runs ("cuda:0", "cpu"), or None when it does not say (a test encoder)."""
    device = getattr(encoder, "device", None)
    return None if device is None else str(device)[:40]


class Heartbeat:
    """One worker run's row; `beat` and `finish` run inside the caller's transaction."""

    def __init__(self, encoder):
        self.id = uuid.uuid4()
        self.encoder = encoder
        self.name = worker_name()

    def beat(self, cursor, rows, started):
        """Add `rows` to the rows done (the run began at `started`, the database's clock)."""
        cursor.execute(BEAT, {"id": str(self.id), "name": self.name, "device": device_of(self.encoder),
                              "rows": rows, "started": started})

    def finish(self, cursor):
        """Mark the run finished, and forget runs that ended more than KEEP_DAYS ago."""
        cursor.execute(FINISH, [str(self.id)])
        cursor.execute(FORGET_OLD)
