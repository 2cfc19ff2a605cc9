"""The backfill's database sessions: each step is one transaction, retried with exponential
backoff on a fresh connection after a transient error (dropped connection, server restart,
lock timeout).

The retry settings (LOCK_TIMEOUT, DB_ATTEMPTS, BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS) are
attributes of the `segments.switch.backfill` package, read at each use: change them there.
"""
import logging
import os
import socket
import sys
import threading

import psycopg2
from django.db import connections

from segments.switch.user_triggers import TriggersNotQuieted, quiet_user_triggers

from .report import BackfillError
from .sql import SET_LOCK_TIMEOUT, SET_SEARCH_PATH

logger = logging.getLogger(__package__)

TRANSIENT_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
# Sessions that write nothing but vectors: the application's triggers on segments must not fire
# on their writes (segments/switch/user_triggers.py).
QUIET_ROLES = {"writer"}


def retry_setting(name):
    """The current value of retry setting `name` of the `segments.switch.backfill` package."""
    return getattr(sys.modules[__package__], name)


def worker_name():
    """host:pid of this process, as the claims and the sessions' application_name show it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def open_connection(using, role, search_path=None):
    """A new psycopg2 connection (not in autocommit) to database `using`, for one stage."""
    wrapper = connections[using]
    private = type(wrapper)(wrapper.settings_dict, using)  # leaves the caller's connection alone
    params = private.get_connection_params()
    params["application_name"] = f"backfill_embeddings {role} {worker_name()}"[:63]
    connection = private.get_new_connection(params)
    try:
        connection.autocommit = False
        with connection, connection.cursor() as cursor:
            cursor.execute(SET_LOCK_TIMEOUT, [retry_setting("LOCK_TIMEOUT")])
            if search_path:
                cursor.execute(SET_SEARCH_PATH, [search_path])
            if role in QUIET_ROLES:
                quiet_user_triggers(cursor)
    except (psycopg2.Error, TriggersNotQuieted):
        connection.close()
        raise
    return connection


def backoff_seconds(attempt):
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    first, most = retry_setting("BACKOFF_FIRST_SECONDS"), retry_setting("BACKOFF_MAX_SECONDS")
    return min(most, first * 2 ** (attempt - 1))


class Session:
    """One database session of the engine; each `run()` is one transaction, retried on a fresh
    connection after a transient error. `on_reconnect(cursor)` runs on every new connection but
    the first."""

    def __init__(self, using, role, search_path=None, stop=None, on_reconnect=None):
        self.using, self.role, self.search_path = using, role, search_path
        self.stop = stop or threading.Event()
        self.on_reconnect = on_reconnect
        self._connection = None
        self._connections_opened = 0

    def connection(self):
        """The open connection, opened (again) if need be."""
        if self._connection is None or self._connection.closed:
            self._connection = open_connection(self.using, self.role, self.search_path)
            self._connections_opened += 1
            if self._connections_opened > 1 and self.on_reconnect is not None:
                with self._connection, self._connection.cursor() as cursor:
                    self.on_reconnect(cursor)
        return self._connection

    def run(self, work, *args):
        """`work(connection, cursor, *args)` in one transaction; its result."""
        attempt = 1
        while True:
            try:
                connection = self.connection()
                with connection, connection.cursor() as cursor:
                    return work(connection, cursor, *args)
            except TRANSIENT_ERRORS as exc:
                self.close()
                self._wait_before_retry(attempt, exc)
            attempt += 1

    def _wait_before_retry(self, attempt, exc):
        message = " ".join(str(exc).split())  # PostgreSQL's DETAIL and CONTEXT lines, on one line
        attempts = retry_setting("DB_ATTEMPTS")
        if attempt >= attempts:
            raise BackfillError(
                f"The database kept failing ({attempts} attempts by the backfill {self.role}): "
                f"{message}. Check that the database server is up and that no session holds locks on "
                "segments for long (pg_stat_activity), then run `manage.py backfill_embeddings` again: "
                "it resumes where it stopped."
            ) from exc
        delay = backoff_seconds(attempt)
        logger.warning("database error in the backfill %s (attempt %d/%d): %s; retrying in %.1f s",
                       self.role, attempt, attempts, message, delay)
        if self.stop.wait(delay):
            raise BackfillError(
                f"The backfill {self.role} lost its database connection while stopping: {message}"
            ) from exc

    def close(self):
        """Close the connection, if any (a broken one too)."""
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg2.Error:
                pass  # already broken: closing it is all that was asked
            self._connection = None
