"""Work that loops over batches, run on the server: the contract's clearing and moving, and its waits.

The contract clears and rewrites a table in thousands of short transactions (a short one for each
batch, so that no application write waits long behind it). Sent from a client one statement at a
time, each costs a few round trips: far from the database (51 ms a round trip) 5,000 rows took 56 s
that took 3.5 s next to it. Here the loop runs on the server instead: a procedure of the session's
own (created in `pg_temp` on the contract's connection: it needs no privilege but TEMP, and goes
with the session) runs one batch statement again and again, committing after each, for up to
SECONDS_PER_CALL, then answers: one round trip per second of work, whatever the batches hold. Its
answer carries the throttle's look, taken as the call ends, so that the next call needs none of its own,
and, from the call that did the last batch, the transactions that can still see what it wrote (those a
VACUUM must wait for), so that the wait begins with no round trip when there are none. Waiting for the
transactions that hold VACUUM back is a function of the same kind, which looks every 0.2 s on the server.

`ServerLink` is that connection: in autocommit mode (a procedure that commits cannot run inside a
transaction), its routines created by its first message, opened again after it drops or goes silent (each
call has a deadline: askdrchaffee/round_trips.py), with backoff, one log line per retry.
"""
import logging
import time
from typing import NamedTuple

import psycopg2
from django.core.management.base import CommandError
from psycopg2 import errors

from askdrchaffee import postgres, round_trips
from askdrchaffee.postgres import QUERY_SHOWN
from segments.switch import horizon

logger = logging.getLogger(__name__)

SECONDS_PER_CALL = 1.0  # the server's loop answers after this much work
LINK_GRACE_SECONDS = 10  # a call not answered this long after its own time went through a silent link
LINK_ATTEMPTS = 8  # tries of one call on new connections before the contract stops
WAIT_STEP_SECONDS = 5.0  # the server's wait for older transactions answers at least this often
QUERY_SECONDS = 60.0  # a look at the table (a count, its sizes) is answered within this, or the link is silent
PATIENT = None  # no deadline: VACUUM and the concurrent index drops take as long as they take
FIRST_ID = -(2**31) - 1  # below every id (a literal PostgreSQL reads as bigint, so the id index serves)

BATCHES = """
CREATE OR REPLACE PROCEDURE pg_temp.segments_batches(
    statement text, INOUT after bigint, INOUT done bigint, INOUT blocked boolean,
    most bigint, seconds double precision, lock_timeout text, replica boolean, INOUT finished timestamptz,
    look text, INOUT wal bigint, INOUT pause json, INOUT replicas json, holders_shown int, INOUT holders json,
    first text, INOUT first_answer json)
LANGUAGE plpgsql AS $procedure$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => seconds);
    rows_done bigint;
    next_after bigint;
    go boolean;
BEGIN
    blocked := false;
    IF first IS NOT NULL THEN  -- a look before the first batch, which says whether there is work to do
        EXECUTE first INTO go, first_answer;
        IF NOT go THEN
            after := NULL;
            RETURN;
        END IF;
    END IF;
    LOOP
        PERFORM set_config('lock_timeout', lock_timeout, true);
        IF replica THEN
            PERFORM set_config('session_replication_role', 'replica', true);
        END IF;
        BEGIN
            EXECUTE statement INTO rows_done, next_after USING after;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            blocked := true;
        END;
        EXIT WHEN blocked;
        done := done + rows_done;
        after := next_after;
        COMMIT;
        EXIT WHEN after IS NULL OR done >= most OR clock_timestamp() >= deadline;
    END LOOP;
    finished := clock_timestamp();
    IF look IS NOT NULL THEN  -- the throttle's look, answered with the call: the next call needs none of its own
        BEGIN
            EXECUTE look INTO wal, pause, replicas;
        EXCEPTION WHEN undefined_table THEN
            wal := NULL;  -- the caller looks for itself
        END;
    END IF;
    IF after IS NULL AND NOT blocked AND holders_shown IS NOT NULL THEN  -- done: who still sees the rows written
        SELECT coalesce(json_agg(json_build_array(h.who, h.state, h.seconds, h.application, h.query)), '[]') INTO holders
        FROM pg_temp.segments_holders(finished, 0, holders_shown) h;
    END IF;
END
$procedure$
"""

HOLDERS = f"""
CREATE OR REPLACE FUNCTION pg_temp.segments_holders(p_since timestamptz, p_seconds double precision,
                                                    p_shown int)
RETURNS TABLE (who text, state text, seconds numeric, application text, query text)
LANGUAGE plpgsql AS $function$
#variable_conflict use_column
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_seconds);
BEGIN
    LOOP
        PERFORM pg_stat_clear_snapshot();
        EXIT WHEN NOT EXISTS ({horizon.SESSIONS_SQL.replace("%(since)s", "p_since").replace("%(shown)s", "p_shown")})
                  OR clock_timestamp() >= deadline;
        PERFORM pg_sleep(0.2);
    END LOOP;
    PERFORM pg_stat_clear_snapshot();
    RETURN QUERY {horizon.SESSIONS_SQL.replace("%(since)s", "p_since").replace("%(shown)s", "p_shown")};
END
$function$
"""


class ContractLinkLost(CommandError):
    """The contract's connection kept failing; what was done stays done."""


ROUTINES = round_trips.message(BATCHES, HOLDERS)  # created on each of the link's connections


class ServerLink:
    """The contract's connection of its own (module docstring), from `connect()`. What each new connection
    needs first (the link's routines, and the connection's own `first_message`: the check of its settings,
    askdrchaffee.postgres.private_connection) goes with the first statement sent on it that may share a
    message (run()'s `shares_message`), a round trip fewer; before any other, alone."""

    def __init__(self, connect, what="the contract"):
        self.connect, self.what = connect, what
        self.connection = None
        self.first = None  # the statements that go before the next one sent: a new connection's
        self.opened_at = 0.0
        self.round_trips_before = 0  # of the connections closed so far
        self.abandoned = []  # server sessions left behind a silent link
        self.reconnects = 0  # connections lost (or gone silent) and opened again

    @property
    def round_trips(self):
        """Messages sent over all its connections (askdrchaffee.round_trips)."""
        return self.round_trips_before + round_trips.round_trips(self.connection)

    def open(self):
        """The connection, opened when it is not (its first statements still to send: `first`)."""
        if self.connection is not None and round_trips.stale(self.opened_at):
            self.close()  # made before a link went silent: silent too
        if self.connection is None or self.connection.closed:
            self.opened_at = time.monotonic()
            connection = self.connect()
            try:
                connection.autocommit = True
                round_trips.end_abandoned(connection, self.abandoned)  # the contract's link is direct
                self.abandoned = []
            except BaseException:
                connection.close()
                raise
            self.connection = connection
            self.first = round_trips.message(ROUTINES, getattr(connection, "first_message", ""))
        return self.connection

    def run(self, work, seconds=QUERY_SECONDS, shares_message=False):
        """work(cursor) on the connection, answered within `seconds` (PATIENT: no deadline; TCP keepalives
        still notice a link that stops acknowledging) and LINK_GRACE_SECONDS; after a lost or silent
        link, again on a new connection (LINK_ATTEMPTS in all, one log line each). Its result.
        `shares_message`: work's first statement may go in one message with the connection's first
        statements (not a CALL, a VACUUM or a CONCURRENTLY, which must be alone in theirs)."""
        for attempt in range(1, LINK_ATTEMPTS + 1):
            try:
                return self._once(work, seconds, shares_message)
            except postgres.TRANSIENT_ERRORS as exc:
                if postgres.connection_refusal(exc) or not _transient(exc):
                    raise
                self._lost(exc, attempt)

    def _lost(self, exc, attempt):
        """After the connection failed with `exc`: close it, then wait before the next attempt, or give up."""
        if isinstance(exc, round_trips.LinkSilent):
            self.abandoned.append(exc.backend_pid)
        self.close()
        self.reconnects += 1
        if attempt == LINK_ATTEMPTS:
            raise ContractLinkLost(
                f"The contract's connection kept failing ({LINK_ATTEMPTS} attempts): {' '.join(str(exc).split())}. "
                "What it did stays done; run `manage.py embedding_switch contract --confirm` again.") from exc
        pause = min(5.0, 0.25 * 2 ** attempt)
        logger.warning("%s: the connection failed (attempt %d/%d): %s; trying again in %.1f s", self.what, attempt,
                       LINK_ATTEMPTS, " ".join(str(exc).split()), pause)
        time.sleep(pause)

    def _once(self, work, seconds, shares_message):
        connection = self.open()
        limit = None if seconds is None else seconds + LINK_GRACE_SECONDS
        with connection.cursor() as cursor, round_trips.deadline(connection, limit, self.what):
            if self.first and not shares_message:
                self._send_first(cursor.execute, "")
            return work(_FirstStatements(cursor, self) if self.first else cursor)

    def _send_first(self, execute, statement):
        """The connection's first statements (`first`), with `statement` in the same message."""
        try:
            execute(round_trips.message(self.first, statement))
        except psycopg2.Error as exc:
            refusal = postgres.settings_refusal(exc)
            if refusal is not None:
                raise refusal from None
            raise
        self.first = None

    def close(self):
        if self.connection is not None:
            self.round_trips_before += round_trips.round_trips(self.connection)
            try:
                self.connection.close()
            except Exception:  # already broken: closing it is all that was asked
                pass
            self.connection = None


class _FirstStatements:
    """A cursor whose first statement carries its link's first statements (ServerLink.first) in its message."""

    def __init__(self, cursor, link):
        self._cursor, self._link = cursor, link

    def execute(self, sql, params=None):
        if not self._link.first:
            return self._cursor.execute(sql, params)
        if params is not None:
            sql = self._cursor.mogrify(sql, params).decode()
        return self._link._send_first(self._cursor.execute, sql)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def _transient(exc):
    """A lost connection or a link gone silent: worth a new connection. Not a lock timeout or a
    deadlock (the batches' own answer to those is `blocked`), not a statement's error."""
    if isinstance(exc, (errors.LockNotAvailable, errors.DeadlockDetected, errors.QueryCanceled)):
        return False
    return isinstance(exc, postgres.TRANSIENT_ERRORS)


def batches(link, statement, *, local, on_batches=None, before_call=None, most=None, lock_attempts=5, look=None,
            first=None):
    """Run `statement` on the server again and again (one transaction each) until it says nothing is left:
    it takes the id to go on after ($1) and answers (rows done, the id to go on after; NULL when done).
    Each call of the server's loop works for up to SECONDS_PER_CALL (and at most `most` rows);
    `before_call(most)` may hold a call back (a throttle); `on_batches(rows)` hears of each call's rows.
    `look`, a throttle (its `look_query` and `observe(row)`), has each call answer with its look, taken
    by the server as the call ends: the next `before_call` rests on it instead of a round trip of its own.
    `first`, (SQL, on_found): a query the first call runs before its first batch, answering (whether to go
    on, a JSON value); on_found(the value) hears it before `on_batches`, and without `go` nothing is done.
    A batch that waits for a lock longer than `local`'s lock_timeout rolls back and the call answers:
    it is tried again after a pause, `lock_attempts` times in a row, then LockBlocked. A Done: the total,
    when the last call ended by the server's clock, and the transactions that could still see its writes
    then (horizon.Holder), looked at by that call."""
    after, total, blocked_in_a_row, finished, holders = FIRST_ID, 0, 0, None, None
    most = most or 2**62
    replica = local.get("session_replication_role") == "replica"
    first_query, on_found = first or (None, None)
    while after is not None:
        if before_call is not None:
            before_call(most)
        look_query = look.look_query if look is not None else None
        after, done, blocked, finished, *looked, holders, found = link.run(
            lambda cursor: _call(cursor, statement, after, most, local, replica, look_query, first_query),
            SECONDS_PER_CALL + postgres.parse_duration_ms(local["lock_timeout"]) / 1000)
        if first_query is not None:
            first_query = None
            on_found(found)
        if look is not None and looked[0] is not None:
            look.observe(looked)
        total += done
        if on_batches is not None and done:
            on_batches(done)
        blocked_in_a_row = blocked_in_a_row + 1 if blocked else 0
        if blocked_in_a_row >= lock_attempts:
            raise LockBlocked(total)
        if blocked:
            time.sleep(0.1 * blocked_in_a_row)
    return Done(total, finished, None if holders is None else [horizon.describe(*row) for row in holders])


class Done(NamedTuple):
    """What batches() did: rows done, when its last write ended (server's clock; None without a call), and
    the transactions that could still see its writes then (None: not looked at)."""

    rows: int
    finished: object
    holders: list = None


class LockBlocked(Exception):
    """A batch kept waiting behind the application's locks; `done` rows were done before."""

    def __init__(self, done):
        super().__init__(done)
        self.done = done


def _call(cursor, statement, after, most, local, replica, look_query, first_query):
    cursor.execute("CALL pg_temp.segments_batches(%s, %s, 0, false, %s, %s, %s, %s, NULL, %s, NULL, NULL, NULL, %s, "
                   "NULL, %s, NULL)", [statement, after, most, SECONDS_PER_CALL, local["lock_timeout"], replica,
                                       look_query, QUERY_SHOWN + 1, first_query])
    return cursor.fetchone()


def holders_after(link, since, seconds):
    """horizon.Holder of each transaction that can still see row versions written before `since`,
    after waiting on the server up to `seconds` (in steps of WAIT_STEP_SECONDS) for them to end."""
    rows = link.run(lambda cursor: _holders(cursor, since, seconds), seconds)
    return [horizon.describe(*row) for row in rows]


def _holders(cursor, since, seconds):
    cursor.execute("SELECT * FROM pg_temp.segments_holders(%s, %s, %s)", [since, seconds, QUERY_SHOWN + 1])
    return cursor.fetchall()
