"""May this worker write now? The switch's bulk writes yield to the database's health.

The backfill's write stage, a follower catching up after a burst, and the contract's clearing ask a
`Throttle` before each batch (`before_write(rows, stop)`). It blocks, and returns when the batch may
go, while:

1. **the switch is paused**: a row in `segments_switch_pause`, written by `embedding_switch pause`
   and deleted by `embedding_switch resume` (`pause()` and `resume()` in segments/switch/steps.py).
   It is in the database, so one command pauses every worker on every machine, and any machine
   resumes them;
2. **a streaming replica lags** more than the limit (BACKFILL_MAX_REPLICA_LAG seconds, 2 by default,
   or the run's --max-replica-lag): a standby that falls behind serves stale reads, and a failover
   to it loses what it has not replayed;
3. **the run is over its rate cap** (--max-rows-per-second, none by default): a token bucket holding
   one second of rows; a batch larger than that goes when the bucket is full, and the next ones
   wait until the debt is paid, so the rate over a few batches is the cap.

It returns at once otherwise. What a batch waited for is never lost: the batch is still in hand, its
rows still claimed, and it is written when the wait ends. A stop request (`stop`, an Event) ends the
wait: `before_write` then returns False and the caller writes nothing.

**What it costs.** It reads the database at most every LOOK_SECONDS (0.5 s), in ONE statement (the
pause row and every replica's state together), on a connection of its own in autocommit (from a
connection factory, the engine's `connect(role)`): nothing per batch, and nothing set for the
session, so it works through a pooler in transaction mode. A pause takes effect at the next batch
after the next look: within LOOK_SECONDS plus one batch's write.

**How a replica's lag is measured.** `pg_stat_replication.replay_lag` is the server's own sample,
and it misleads in both directions when the standby's replay is paused or stuck: once the
primary stops sending WAL it stays at its last value (measured here: frozen at 3.5 s while the real
lag grew past 7 s), and after the standby has caught up it keeps its last, high value until new WAL
flows (3.3 s for 7 s here), which would hold a throttled backfill back for nothing. So a
`LagTracker` keeps its own record: at each look, the time and `pg_current_wal_lsn()`; a replica's
lag is 0 once its `replay_lsn` has reached the LSN current at the look, and otherwise at least the
time since the first remembered look whose LSN it has not replayed yet (that WAL was written before
that look). The server's `replay_lag` is taken where it is larger, capped by the time since the last
look the replica has replayed (what it lacks was written after it): that covers the first looks at
a replica already behind, and WAL written long before a look, without trusting a stale sample.
Physical standbys only: logical
replication's walsenders, and a pg_basebackup in progress, do not count. Without the
`pg_monitor` role (or `pg_read_all_stats`) the server hides the replicas' positions: the throttle
says so once, naming the GRANT, and cannot hold the writes back for lag.

`waiting_for` says, in a sentence, why it holds back now ("" when it does not): the heartbeat
writes it to `segments_backfill_worker.waiting_for`, which `embedding_status` and the admin show.
It says on one line (`say`) when it starts waiting and when it goes on.
"""
import bisect
import collections
import json
import logging
import threading
import time
from dataclasses import dataclass

import psycopg2
from psycopg2 import errors

from askdrchaffee import round_trips

logger = logging.getLogger(__name__)

LOOK_SECONDS = 0.5  # the longest a decision may rest on what the database said
LOOK_ANSWERED_SECONDS = 10  # a look not answered in this long went through a silent link: it writes on
TAKES_EFFECT_SECONDS = 2  # what the operator is told: a pause or a resume reaches every worker within this
REMEMBERED_LOOKS = 7200  # an hour of looks at LOOK_SECONDS: the lag tracker's memory
RATE_BURST_SECONDS = 1.0  # the token bucket holds this many seconds of the rate cap
SETTING = object()  # max_replica_lag: BACKFILL_MAX_REPLICA_LAG
PAUSE_TABLE = "segments_switch_pause"
SCOPE = "all"
WAITING_FOR_LENGTH = 300  # segments_backfill_worker.waiting_for's width

LOOK = """
    SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
           {pause},
           (SELECT coalesce(json_agg(json_build_object(
                       'pid', r.pid, 'name', r.application_name, 'address', host(r.client_addr),
                       'replayed', pg_wal_lsn_diff(r.replay_lsn, '0/0')::bigint,
                       'replay_lag', extract(epoch FROM r.replay_lag)) ORDER BY r.pid), '[]')
            FROM pg_stat_replication r
            WHERE r.state IN ('streaming', 'catchup')
              AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid
                                                                     AND s.slot_type = 'logical'))
"""
PAUSED_AT = "to_char(p.paused_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"  # a Pause's `at`
WITH_PAUSE = LOOK.format(pause=f"""(SELECT json_build_object('by', p.paused_by, 'reason', p.reason, 'at', {PAUSED_AT})
                                    FROM {PAUSE_TABLE} p WHERE p.scope = '{SCOPE}')""")
# Before migration 0011 there is no pause table: nobody can have paused; each look asks whether it came.
WITHOUT_PAUSE = LOOK.format(pause=f"CASE WHEN to_regclass('{PAUSE_TABLE}') IS NOT NULL THEN '{{}}'::json END")


# --- settings -----------------------------------------------------------------------------------

def max_replica_lag_setting():
    """BACKFILL_MAX_REPLICA_LAG: seconds a streaming replica may lag before the bulk writes wait (None: off)."""
    from django.conf import settings

    return getattr(settings, "BACKFILL_MAX_REPLICA_LAG", 2.0)


def parse_max_replica_lag(raw):
    """--max-replica-lag: seconds above 0, or "off" (None); ValueError otherwise."""
    if str(raw).strip().lower() == "off":
        return None
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
    return value


def parse_rows_per_second(raw):
    """--max-rows-per-second: a rate above 0; ValueError otherwise."""
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
    return value


def rows_per_second_argument(raw):
    """argparse type of --max-rows-per-second (backfill_embeddings, embedding_switch contract)."""
    import argparse

    try:
        return parse_rows_per_second(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of rows above 0, not {raw!r}") from None


def replica_lag_argument(raw):
    """argparse type of --max-replica-lag: seconds above 0, or off (None)."""
    import argparse

    try:
        return parse_max_replica_lag(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give seconds above 0 (such as 2 or 0.5), or off; not {raw!r}") from None


# --- what a look sees ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Pause:
    """The operator's pause: who (host:pid of the command), since when (UTC), why."""

    by: str
    at: str
    reason: str

    def sentence(self):
        why = f" ({self.reason})" if self.reason else ""
        return f"paused by {self.by or 'an operator'} since {self.at} UTC{why}"


@dataclass(frozen=True)
class Replica:
    """A streaming replica as pg_stat_replication shows it; positions as byte offsets (None: hidden)."""

    pid: int
    name: str
    address: str | None
    replayed: int | None
    replay_lag: float | None  # the server's own sample, seconds

    @property
    def where(self):
        return f"at {self.address}" if self.address else "on a local socket"

    def describe(self):
        return f"replica '{self.name or self.pid}' {self.where}"


@dataclass(frozen=True)
class Lag:
    replica: Replica
    seconds: float
    tracked: float | None  # the client-side tracker's figure (None: the position is hidden)


class LagTracker:
    """Each replica's replay lag from the looks' (time, current WAL position) (module docstring)."""

    def __init__(self, remembered=REMEMBERED_LOOKS):
        self.remembered = remembered
        self.times = collections.deque()
        self.positions = collections.deque()

    def observe(self, now, current, replicas):
        """[Lag] of `replicas` at time `now` (seconds, any clock), the primary's WAL at `current`."""
        self.times.append(now)
        self.positions.append(current)
        lags = [self._lag(now, current, replica) for replica in replicas]
        self._forget([replica.replayed for replica in replicas])
        return lags

    def _lag(self, now, current, replica):
        if replica.replayed is None:  # the role may not see positions: the server's sample, if it shows one
            return Lag(replica, replica.replay_lag or 0.0, None)
        if replica.replayed >= current:
            return Lag(replica, 0.0, 0.0)
        first = bisect.bisect_right(self.positions, replica.replayed)  # the first look not replayed yet
        tracked = now - self.times[first]  # the least it can be: that WAL was written before that look
        sample = replica.replay_lag or 0.0
        if first > 0:  # it replayed the look before: what it lacks was written since, so no more than that
            sample = min(sample, now - self.times[first - 1])  # (a stale sample is capped too)
        return Lag(replica, max(tracked, sample), tracked)

    def _forget(self, replayed):
        """Keep the last look every replica has replayed (the anchor) and every later one."""
        known = [position for position in replayed if position is not None]
        slowest = min(known) if known else self.positions[-1]
        while len(self.positions) > 1 and self.positions[1] <= slowest:
            self.times.popleft()
            self.positions.popleft()
        while len(self.positions) > self.remembered:
            self.times.popleft()
            self.positions.popleft()


@dataclass(frozen=True)
class Health:
    """One look: the pause (None), the replicas' lags, and the worst lag over the limit (None)."""

    pause: Pause | None
    lags: tuple
    over: Lag | None
    positions_hidden: bool = False


class TokenBucket:
    """A rate cap: `rate` rows a second, a burst of `burst_seconds` of them. `wait(rows, now)` takes
    the rows and returns 0 when they may go now, else the seconds to wait before asking again (and
    takes nothing). A request larger than the bucket goes when the bucket is full, leaving a debt."""

    def __init__(self, rate, burst_seconds=RATE_BURST_SECONDS, now=0.0):
        self.rate = float(rate)
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.tokens, self.updated = self.capacity, now

    def wait(self, rows, now):
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = max(self.updated, now)
        needed = min(float(rows), self.capacity)
        if self.tokens >= needed - 1e-6:  # a rounding error short is no reason to wait again
            self.tokens -= rows
            return 0.0
        return (needed - self.tokens) / self.rate


# --- the throttle -------------------------------------------------------------------------------

class Throttle:
    """May this worker write now? (module docstring)

    - `connect(role)`: a factory of new psycopg2 connections (the engine's); by default one to
      Django's database `using` (segments.switch.backfill.session.connector).
    - `max_replica_lag`: seconds, None (no limit), or BACKFILL_MAX_REPLICA_LAG (the default).
    - `max_rows_per_second`: the rate cap (None: none).
    - `free_rows`: batches of at most this many rows go at once, without a look (the follower's
      single arrivals; 0: none).
    - `say(line)`: one line when it starts waiting and when it goes on.
    - `what`: what waits, for those lines ("the backfill", "the contract").
    """

    def __init__(self, connect=None, *, using="default", max_replica_lag=SETTING, max_rows_per_second=None,
                 free_rows=0, say=None, what="the backfill", clock=time.monotonic, look_seconds=LOOK_SECONDS):
        if connect is None:
            from segments.switch.backfill.session import connector

            connect = connector(using)
        self.connect = connect
        self.max_replica_lag = max_replica_lag_setting() if max_replica_lag is SETTING else max_replica_lag
        self.max_rows_per_second = max_rows_per_second
        self.free_rows = free_rows
        self.say = say or (lambda line: logger.info("%s", line))
        self.what = what
        self.clock, self.look_seconds = clock, look_seconds
        self.tracker = LagTracker()
        self.bucket = TokenBucket(max_rows_per_second, now=clock()) if max_rows_per_second else None
        self._lock = threading.Lock()
        self._look_lock = threading.Lock()
        self._looking = False
        self._connection = None
        self._opened_at = 0.0
        self._query = WITH_PAUSE
        self._health = Health(None, (), None)
        self._looked_at = None
        self._look_failed = False
        self._said_hidden = False
        self._holding = None  # (kind, since) of the wait in progress
        self._rate_waited_at = None
        self._said_rate = False

    # What the heartbeat and the output show.

    @property
    def waiting_for(self):
        """Why the writes wait now, in a sentence ("" when they do not). Read without the lock (the
        heartbeat's thread asks while a look may be under way): the attributes are replaced whole."""
        health, holding, rate_waited_at = self._health, self._holding, self._rate_waited_at
        reason = self._reason(health) if holding else None
        if reason is None and rate_waited_at is not None and self.clock() - rate_waited_at < 2 * self.look_seconds:
            reason = f"rate cap {self.max_rows_per_second:,g} rows/s"
        return (reason or "")[:WAITING_FOR_LENGTH]

    # The decision.

    def before_write(self, rows, stop=None):
        """Block while paused, while a replica lags over the limit, or while over the rate cap; True
        when `rows` rows may be written now, False when `stop` was set meanwhile (write nothing)."""
        stop = stop or threading.Event()
        if self.free_rows and rows <= self.free_rows:
            return not stop.is_set()
        while not stop.is_set():
            health = self.health()
            reason = self._reason(health)
            if reason is not None:
                self._hold(health, reason)
                stop.wait(self.look_seconds)
                continue
            self._go_on()
            wait = self._take(rows)
            if not wait:
                return True
            stop.wait(min(wait, self.look_seconds))
        return False

    def health(self):
        """What the database said at most LOOK_SECONDS ago (a look now when it is older). While another
        thread's look is on its way, what the last look said: far from the database a look is a round
        trip, and the other writers do not wait for it (only for the first)."""
        with self._lock:
            if self._looked_at is not None and (self._looking or self.clock() - self._looked_at < self.look_seconds):
                return self._health
        with self._look_lock:  # one look at a time; the first waits for it
            with self._lock:
                if self._looked_at is not None and self.clock() - self._looked_at < self.look_seconds:
                    return self._health
                self._looking = True
            try:
                health = self._look(self.clock())
            finally:
                with self._lock:
                    self._looking = False
            with self._lock:
                self._health, self._looked_at = health, self.clock()
                return health

    def goes_now(self, rows):
        """Whether `rows` rows may be written at once, without waiting (else before_write() waits): nothing
        holds the writes back, and no rate cap counts them."""
        if self.free_rows and rows <= self.free_rows:
            return True
        if self.bucket is not None or self._reason(self.health()) is not None:
            return False
        self._go_on()
        return True

    def look_ahead(self):
        """Take a look now, in the background: a backfill's pass starts it with its first claim, and its first
        write finds the look taken, or on its way, instead of sending it then (far away, a round trip)."""
        threading.Thread(target=self._look_quietly, daemon=True, name="throttle-look").start()

    def _look_quietly(self):
        try:
            self.health()
        except Exception as exc:  # the first write looks again, and reports it
            logger.debug("%s's look ahead failed: %s", self.what, exc)

    def _reason(self, health):
        if health.pause is not None:
            return health.pause.sentence()
        if health.over is not None:
            lag = health.over
            return f"{lag.replica.describe()} is {lag.seconds:.1f} s behind (limit {self.max_replica_lag:g} s)"
        return None

    def _kind(self, health):
        return "pause" if health.pause is not None else f"replica {health.over.replica.pid}"

    def _hold(self, health, reason):
        kind = self._kind(health)
        with self._lock:
            if self._holding is not None and self._holding[0] == kind:
                return
            self._holding = (kind, self.clock())
        self.say(f"Waiting: {self.what} holds its writes back: {reason}.")

    def _go_on(self):
        with self._lock:
            if self._holding is None:
                return
            seconds = self.clock() - self._holding[1]
            self._holding = None
        self.say(f"Going on: {self.what} writes again (it waited {seconds:.1f} s).")

    def _take(self, rows):
        if self.bucket is None:
            return 0.0
        with self._lock:
            wait = self.bucket.wait(rows, self.clock())
            if wait:
                self._rate_waited_at = self.clock()
            first = wait and not self._said_rate
            self._said_rate = self._said_rate or bool(wait)
        if first:
            self.say(f"Rate cap: {self.what} writes at most {self.max_rows_per_second:,g} rows/s.")
        return wait

    # The look: one statement.

    @property
    def look_query(self):
        """The statement of a look, for a caller that sends it in a message of its own (then `observe`)."""
        return self._query

    @property
    def look_query_for_reads(self):
        """look_query for a caller that reads it with other reads (round_trips.reads, whose JSON keeps no
        key of a nested object): the pause and the replicas as JSON text, which observe() reads."""
        return f"SELECT l.wal, l.pause::text, l.replicas::text FROM ({self._query}) AS l(wal, pause, replicas)"

    def observe(self, row):
        """A look someone else took with `look_query` or `look_query_for_reads` (the contract's server loop
        answers each call with one), its row, as if this throttle had just taken it: the decisions of the
        next LOOK_SECONDS rest on it, with no look of their own."""
        row = tuple(json.loads(value) if isinstance(value, str) else value for value in row)
        with self._look_lock:
            self._learned(row)
            health = self._health_of(row, self.clock())
            with self._lock:
                self._health, self._looked_at = health, self.clock()

    def _look(self, now):
        try:
            row = self._read()
        except psycopg2.Error as exc:  # the database is away (the write retries as it does), or a standby
            if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                self._close()
            if not self._look_failed:
                logger.warning("%s could not look at the database's health (%s); it writes on meanwhile",
                               self.what, " ".join(str(exc).split()))
            self._look_failed = True
            return Health(None, (), None)
        self._look_failed = False
        return self._health_of(row, now)

    def _health_of(self, row, now):
        """The Health a look's row (its WAL position, the pause, the replicas) says at `now`."""
        current, pause, replicas = row
        pause = Pause(pause["by"], pause["at"], pause["reason"]) if pause and "by" in pause else None
        replicas = [Replica(r["pid"], r["name"], r["address"], r["replayed"], r["replay_lag"]) for r in replicas]
        hidden = any(replica.replayed is None for replica in replicas)
        if hidden and not self._said_hidden:
            self._said_hidden = True
            self.say("The database hides its replicas' positions from this role: their lag cannot hold the "
                     "writes back. `GRANT pg_monitor TO <this role>;` lets it see them.")
        lags = tuple(self.tracker.observe(now, current, replicas))
        over = None
        if self.max_replica_lag is not None:
            late = [lag for lag in lags if lag.seconds > self.max_replica_lag]
            over = max(late, key=lambda lag: lag.seconds) if late else None
        return Health(pause, lags, over, hidden)

    def _read(self):
        connection = self._open()
        with connection.cursor() as cursor, round_trips.deadline(connection, LOOK_ANSWERED_SECONDS, self.what):
            try:
                cursor.execute(self._query)
            except errors.UndefinedTable:  # before migration 0011: nobody can have paused
                self._query = WITHOUT_PAUSE
                cursor.execute(self._query)
            row = cursor.fetchone()
        self._learned(row)
        return row

    def _learned(self, row):
        if self._query is WITHOUT_PAUSE and row[1] is not None:  # the table came: look at it from now on
            self._query = WITH_PAUSE

    def open_quietly(self):
        """Open its connection ahead of its first look (far from the database a connection costs a few round
        trips); a failure is left to that look, which reports it."""
        with self._look_lock:
            try:
                self._open()
            except Exception as exc:  # reported, with its fix, by the first look
                logger.debug("opening %s's connection ahead failed: %s", self.what, exc)

    def _open(self):
        if self._connection is not None and round_trips.stale(self._opened_at):
            self._close()  # made before a link went silent: silent too
        if self._connection is None or self._connection.closed:
            self._opened_at = time.monotonic()
            self._connection = self.connect("throttle")
            self._connection.autocommit = True
        return self._connection

    def _close(self):
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass
            self._connection = None

    def close(self):
        with self._look_lock:
            self._close()


# --- the operator's pause -----------------------------------------------------------------------

def current_pause(cursor, table_exists=None):
    """The pause in force (a Pause) or None; None too before migration 0011 (`table_exists`: whether its
    table is there, when the caller knows; else it is looked up)."""
    if table_exists is None:
        cursor.execute(f"SELECT to_regclass('{PAUSE_TABLE}') IS NOT NULL")
        table_exists = cursor.fetchone()[0]
    if not table_exists:
        return None
    cursor.execute(PAUSE_QUERY, [SCOPE])
    row = cursor.fetchone()
    return None if row is None else Pause(*row)


# The pause in force (PAUSE_TABLE): by, since (UTC, to the second), reason; no row when none.
PAUSE_QUERY = f"SELECT p.paused_by, {PAUSED_AT}, p.reason FROM {PAUSE_TABLE} p WHERE p.scope = %s"
