"""The backfill's database sessions: each step is one message to the server, retried with exponential
backoff on a fresh connection after a transient error (dropped connection, server restart, lock
timeout, a link gone silent).

A worker far from its database pays each round trip 20-150 ms, so every step of the engine is one
message (askdrchaffee/round_trips.py): the session's connection is in autocommit mode, and a step's
statements, this session's settings first, go to the server together as one implicit transaction
that the server commits at its end (`query`: one round trip; `write`: a batch with its COPY, two;
`write_ahead`: the same message sent before its batch is there, one round trip once it is).
The few steps that need a transaction spanning several messages (resolving the target, once a
run) use `run`.

A session's connections come from a factory (`connect(role)`, by default a new connection to the
Django database `using`), and nothing is ever set for the session: what a transaction needs
(lock_timeout, statement_timeout, and for the writers `session_replication_role = replica` where
the application's triggers must stay quiet) is set at its start for that transaction only, so the
engine can run through a pooler in transaction mode, which hands each transaction to any server
connection. Every message must be answered within its statement_timeout and LINK_GRACE_SECONDS more:
else the link has gone silent (round_trips.deadline), the connection is closed, and the step is
retried on a new one.

The retry settings (LOCK_TIMEOUT, DB_ATTEMPTS, BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS) are
attributes of the `segments.switch.backfill` package, read at each use: change them there.
"""
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

import psycopg2

from askdrchaffee import postgres, round_trips
from segments.switch.user_triggers import PARAMETER as REPLICATION_ROLE
from segments.switch.user_triggers import triggers_to_quiet

from .report import BackfillError

logger = logging.getLogger(__package__)

TRANSIENT_ERRORS = postgres.TRANSIENT_ERRORS
# Sessions that write nothing but vectors: the application's triggers on segments must not fire
# on their writes (segments/switch/user_triggers.py).
QUIET_ROLES = {"writer"}
STATEMENT_TIMEOUT_SECONDS = 20  # the server gives up a step after this (a batch takes well under a second)
LINK_GRACE_SECONDS = 5  # and a step not answered this long after that went through a silent link


def retry_setting(name):
    """The current value of retry setting `name` of the `segments.switch.backfill` package."""
    return getattr(sys.modules[__package__], name)


def worker_name():
    """host:pid of this process, as the claims and the sessions' application_name show it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def connector(using="default", search_path=None, through=None):
    """The default connection factory: `connect(role)` opens a new psycopg2 connection (not in
    autocommit; a CountedConnection) to Django's database `using`, named after the role in
    pg_stat_activity, with `search_path` (schemas, comma-separated) as a startup option when given
    (for a direct connection: the benchmark's scratch copies), and to host and port `through`
    ((host, port)) instead of the database's own when given (the benchmark's delay proxy)."""
    def connect(role):
        private, params = postgres.connection_params(using)
        if through is not None:
            params["host"], params["port"] = through
        params["application_name"] = f"backfill_embeddings {role} {worker_name()}"[:63]
        params["connection_factory"] = round_trips.CountedConnection
        if search_path:
            params["options"] = f"{params.get('options', '')} -c search_path={search_path.replace(' ', '')}".strip()
        connection = private.get_new_connection(params)
        connection.autocommit = False
        return connection

    return connect


def open_connection(using, role):
    """A new psycopg2 connection (not in autocommit) to database `using`, for one stage."""
    return connector(using)(role)


def backoff_seconds(attempt):
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    first, most = retry_setting("BACKOFF_FIRST_SECONDS"), retry_setting("BACKOFF_MAX_SECONDS")
    return min(most, first * 2 ** (attempt - 1))


class Session:
    """One database session of the engine (module docstring): `query` and `write` send one message,
    `run` one transaction of several; each retried on a fresh connection after a transient error.
    `settings` ({name: value}) are what each of its transactions sets for itself, beside
    lock_timeout and statement_timeout. `on_reconnect(cursor)` runs on every new connection but the
    first. `forever=True` retries without end (the follower), logging one line per failure."""

    def __init__(self, connect, role, stop=None, on_reconnect=None, forever=False, settings=None):
        self.connect, self.role = connect, role
        self.stop = stop or threading.Event()
        self.on_reconnect = on_reconnect
        self.forever = forever
        self.settings = dict(settings or {})
        self.quiet_triggers = False  # set on connecting: the writers' transactions run in replica mode
        self.pooled = None  # whether the connection goes through a pooler (postgres.behind_pooler)
        self._connection = None
        self._opened_at = 0.0
        self._connections_opened = 0
        self.round_trips_before = 0  # round trips of the connections closed so far
        self.abandoned = []  # server sessions of connections lost to a silent link, to end once reconnected

    @property
    def round_trips(self):
        """Messages this session has sent (askdrchaffee.round_trips), over all its connections."""
        return self.round_trips_before + round_trips.round_trips(self._connection)

    def connection(self):
        """The open connection (autocommit), opened (again) if need be: closed, or made before a link
        went silent (round_trips.stale)."""
        if self._connection is not None and round_trips.stale(self._opened_at):
            self.close()
        if self._connection is None or self._connection.closed:
            opened_at = time.monotonic()
            connection = self.connect(self.role)
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    if self.role in QUIET_ROLES:
                        self.quiet_triggers = bool(triggers_to_quiet(cursor))
                self.pooled = postgres.behind_pooler(connection)[0]
                if not self.pooled:
                    round_trips.end_abandoned(connection, self.abandoned)
                self.abandoned = []
            except BaseException:
                connection.close()
                raise
            self._connection, self._opened_at = connection, opened_at
            self._connections_opened += 1
            if self._connections_opened > 1 and self.on_reconnect is not None:
                self.run(lambda _connection, cursor: self.on_reconnect(cursor))
        return self._connection

    def prologue(self):
        """The statement that opens each of this session's transactions: its settings, for itself only."""
        values = {"lock_timeout": retry_setting("LOCK_TIMEOUT"), "statement_timeout": f"{STATEMENT_TIMEOUT_SECONDS}s",
                  **self.settings}
        if self.quiet_triggers:
            values[REPLICATION_ROLE] = "replica"
        return "SELECT " + ", ".join(f"set_config({postgres.quote_literal(name)}, {postgres.quote_literal(str(value))}, "
                                     "true)" for name, value in values.items())

    def query(self, sql, params=None):
        """`sql` (statements, joined with round_trips.message) after the session's settings, as one message:
        one transaction, one round trip; the rows of its last statement (None when it returns none)."""
        return self._retried(self._query, sql, params)

    def write(self, writer, batch_rows, before=(), after=()):
        """One batch of VectorWriter `writer` ((ids, md5s, vectors)) with the statements `before` and `after`
        (cursor.mogrify'd), after the session's settings, as one message; rows written."""
        return self._retried(self._write, writer, batch_rows, before, after)

    def write_ahead(self, writer, next_batch, rows, before=(), after=()):
        """VectorWriter `writer`'s write_ahead() (its message sent before its batch is known) on this session,
        after the session's settings; rows written. Sent once, not retried: the batch a retry needs may be
        taken already, and the caller writes it with `write`. A failure of the link closes the connection
        (the next step opens another)."""
        connection = self._retried(self.connection)
        writer.connection = connection
        try:
            with self._answered(connection):
                return writer.write_ahead(next_batch, rows, prologue=[self.prologue()], before=before, after=after)
        except TRANSIENT_ERRORS:
            self.close()
            raise

    def run(self, work, *args):
        """`work(connection, cursor, *args)` in one transaction of several messages; its result."""
        return self._retried(self._transaction, work, *args)

    def call(self, work):
        """`work(connection)` on the open connection, in autocommit (it ends what it begins); its result."""
        return self._retried(lambda: work(self.connection()))

    def round_trip_ms(self, times=1):
        """The round trip to the server now (round_trips.measure_ms), ms."""
        return self._retried(self._measure, times)

    def _measure(self, times):
        connection = self.connection()
        with self._answered(connection):
            return round_trips.measure_ms(connection, times)

    def mogrify(self, sql, params):
        """`sql` with `params` bound, as the server will read it (to join it to a message); the connection it
        needs is opened, with retries, if a failure closed it."""
        return self._retried(self._mogrify, sql, params)

    def _mogrify(self, sql, params):
        with self.connection().cursor() as cursor:
            return cursor.mogrify(sql, params).decode()

    def _retried(self, step, *args):
        """step(*args), retried (postgres.retrying) after a transient error on a fresh connection; its
        result. BackfillError when the tries are spent."""
        attempts = None if self.forever else retry_setting("DB_ATTEMPTS")
        retrying = postgres.retrying(attempts=attempts, wait=backoff_seconds, before_retry=self.close,
                                     sleep=self._sleep, what=f"the backfill {self.role}")
        try:
            return retrying(step, *args)
        except TRANSIENT_ERRORS as exc:
            self.close()
            if postgres.connection_refusal(exc):
                raise  # a setting to fix (never retried): the command says which, in one line
            raise BackfillError(
                f"The database kept failing ({attempts} attempts by the backfill {self.role}): "
                f"{' '.join(str(exc).split())}. Check that the database server is up and that no session holds "
                "locks on segments for long (pg_stat_activity), then run `manage.py backfill_embeddings` again: "
                "it resumes where it stopped."
            ) from exc

    @contextmanager
    def _answered(self, connection):
        """The deadline of a message on `connection` (round_trips.deadline); a session left behind a silent
        link is remembered, to be ended from the next connection."""
        try:
            with round_trips.deadline(connection, STATEMENT_TIMEOUT_SECONDS + LINK_GRACE_SECONDS,
                                      f"the backfill {self.role}"):
                yield
        except round_trips.LinkSilent as exc:
            self.abandoned.append(exc.backend_pid)
            raise

    def _query(self, sql, params):
        connection = self.connection()
        with connection.cursor() as cursor, self._answered(connection):
            cursor.execute(round_trips.message(self.prologue(), sql), params)
            return cursor.fetchall() if cursor.description else None

    def _write(self, writer, batch_rows, before, after):
        connection = self.connection()
        writer.connection = connection
        with self._answered(connection):
            return writer.write(*batch_rows, prologue=[self.prologue()], before=before, after=after)

    def _transaction(self, work, *args):
        connection = self.connection()
        with connection.cursor() as cursor, self._answered(connection):
            cursor.execute(round_trips.message("BEGIN", self.prologue()))
            try:
                result = work(connection, cursor, *args)
            except BaseException:
                self._end(cursor, "ROLLBACK")
                raise
            cursor.execute("COMMIT")
            return result

    @staticmethod
    def _end(cursor, statement):
        try:
            cursor.execute(statement)
        except psycopg2.Error:
            pass  # the connection is gone: the server ended the transaction itself

    def _sleep(self, seconds):
        """Wait before a retry; a stop request ends the wait and the run."""
        if self.stop.wait(seconds):
            raise BackfillError(f"The backfill {self.role} lost its database connection while stopping.")

    def close(self):
        """Close the connection, if any (a broken one too)."""
        if self._connection is not None:
            self.round_trips_before += round_trips.round_trips(self._connection)
            try:
                self._connection.close()
            except psycopg2.Error:
                pass  # already broken: closing it is all that was asked
            self._connection = None
