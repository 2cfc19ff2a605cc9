"""The backfill's database sessions: each step is one transaction, retried with exponential
backoff on a fresh connection after a transient error (dropped connection, server restart,
lock timeout).

A session's connections come from a factory (`connect(role)`, by default a new connection to the
Django database `using`), and nothing is ever set for the session: what a transaction needs
(lock_timeout, and for the writers `session_replication_role = replica` where the application's
triggers must stay quiet) is set at its start for that transaction only, so the engine can run
through a pooler in transaction mode, which hands each transaction to any server connection.

The retry settings (LOCK_TIMEOUT, DB_ATTEMPTS, BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS) are
attributes of the `segments.switch.backfill` package, read at each use: change them there.
"""
import logging
import os
import socket
import sys
import threading

import psycopg2

from askdrchaffee import postgres
from segments.switch.user_triggers import quiet_for_this_transaction, triggers_to_quiet

from .report import BackfillError

logger = logging.getLogger(__package__)

TRANSIENT_ERRORS = postgres.TRANSIENT_ERRORS
# Sessions that write nothing but vectors: the application's triggers on segments must not fire
# on their writes (segments/switch/user_triggers.py).
QUIET_ROLES = {"writer"}


def retry_setting(name):
    """The current value of retry setting `name` of the `segments.switch.backfill` package."""
    return getattr(sys.modules[__package__], name)


def worker_name():
    """host:pid of this process, as the claims and the sessions' application_name show it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def connector(using="default", search_path=None):
    """The default connection factory: `connect(role)` opens a new psycopg2 connection (not in
    autocommit) to Django's database `using`, named after the role in pg_stat_activity, with
    `search_path` (schemas, comma-separated) as a startup option when given (for a direct
    connection: the benchmark's scratch copies)."""
    def connect(role):
        private, params = postgres.connection_params(using)
        params["application_name"] = f"backfill_embeddings {role} {worker_name()}"[:63]
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
    """One database session of the engine; each `run()` is one transaction, retried on a fresh
    connection after a transient error. `on_reconnect(cursor)` runs on every new connection but
    the first. `forever=True` retries without end (the follower), logging one line per failure."""

    def __init__(self, connect, role, stop=None, on_reconnect=None, forever=False):
        self.connect, self.role = connect, role
        self.stop = stop or threading.Event()
        self.on_reconnect = on_reconnect
        self.forever = forever
        self.quiet_triggers = False  # set on connecting: the writers' transactions run in replica mode
        self.pooled = None  # whether the connection goes through a pooler (postgres.behind_pooler)
        self._connection = None
        self._connections_opened = 0

    def connection(self):
        """The open connection, opened (again) if need be."""
        if self._connection is None or self._connection.closed:
            connection = self.connect(self.role)
            try:
                with connection:
                    with connection.cursor() as cursor:
                        if self.role in QUIET_ROLES:
                            self.quiet_triggers = bool(triggers_to_quiet(cursor))
                    self.pooled = postgres.behind_pooler(connection)[0]
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            self._connections_opened += 1
            if self._connections_opened > 1 and self.on_reconnect is not None:
                with self._connection, self._connection.cursor() as cursor:
                    self.on_reconnect(cursor)
        return self._connection

    def run(self, work, *args):
        """`work(connection, cursor, *args)` in one transaction, retried (postgres.retrying) after a
        transient error on a fresh connection; its result. BackfillError when the tries are spent."""
        attempts = None if self.forever else retry_setting("DB_ATTEMPTS")
        retrying = postgres.retrying(attempts=attempts, wait=backoff_seconds, before_retry=self.close,
                                     sleep=self._sleep, what=f"the backfill {self.role}")
        try:
            return retrying(self._transaction, work, *args)
        except TRANSIENT_ERRORS as exc:
            self.close()
            raise BackfillError(
                f"The database kept failing ({attempts} attempts by the backfill {self.role}): "
                f"{' '.join(str(exc).split())}. Check that the database server is up and that no session holds "
                "locks on segments for long (pg_stat_activity), then run `manage.py backfill_embeddings` again: "
                "it resumes where it stopped."
            ) from exc

    def _transaction(self, work, *args):
        connection = self.connection()
        with connection, connection.cursor() as cursor:
            self._begin(cursor)
            return work(connection, cursor, *args)

    def _begin(self, cursor):
        """What every transaction of this session runs first: its own settings, for itself only."""
        postgres.set_local(cursor, lock_timeout=retry_setting("LOCK_TIMEOUT"))
        if self.quiet_triggers:
            quiet_for_this_transaction(cursor)

    def _sleep(self, seconds):
        """Wait before a retry; a stop request ends the wait and the run."""
        if self.stop.wait(seconds):
            raise BackfillError(f"The backfill {self.role} lost its database connection while stopping.")

    def close(self):
        """Close the connection, if any (a broken one too)."""
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass  # already broken: closing it is all that was asked
            self._connection = None
