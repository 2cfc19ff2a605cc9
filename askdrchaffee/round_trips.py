"""Round trips to the database: the unit of cost when the database is far away.

An operator embeds on a GPU at home and the database runs on a managed host abroad: every client
round trip costs 20-150 ms there, whatever the statement does. So the switch's loops (a backfill
batch, a claim, a follower's pass, a contract's batches, verify's samples, the status) are written
to a constant, small number of round trips each, whatever they hold, and what they cost is
counted here, in one place:

- **One message** (`message`): statements that belong together are sent as one Query message.
  On a connection in autocommit mode PostgreSQL runs them as one implicit transaction that
  commits at the end (a failure rolls all of them back at once, releasing their locks without
  another round trip) and answers once; psycopg2 hands back the last statement's rows. A COPY
  FROM STDIN inside the message costs one round trip more (the server asks for the data: a
  message sent before its data is ready hides it), and the rows of the statements after it are
  not handed back, only the last one's row count.
- **Several reads, one statement** (`reads`): reads whose answers the client needs together (a
  step's look at the catalogue, sizes and counts) go as one SELECT of one JSON array each.
- **Counting** (`CountedConnection`, a psycopg2 connection class): every message it sends is
  counted (`connection.round_trips`), a COPY as two, the BEGIN psycopg2 sends by itself before a
  transaction's first statement as one, a COMMIT or ROLLBACK as one. The tests hold the loops to
  their counts with it.
- **Measuring** (`measure_ms`): the round trip now, as the best of a few `SELECT 1`.
- **Links that go silent** (`deadline`): a connection whose packets vanish (a home router drops
  its NAT entry, Wi-Fi goes; or a local tunnel or proxy stops forwarding and acknowledges
  everything itself, where TCP keepalives see nothing wrong) leaves a statement waiting for an
  answer that never comes. Every message the switch sends in a loop has a deadline a little past
  its server-side statement_timeout: a watchdog thread shuts the socket down when it passes, the
  statement fails at once as a lost connection, and the caller reconnects and goes on. The link
  that went silent for one connection went silent for the others made before it: the watchdog
  shuts down every connection waiting for an answer at that moment, and `stale(opened_at)` tells a
  caller that its idle connection is of that time, to be opened again before its next message.

Nothing here knows the project's tables.
"""
import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager

import psycopg2
from psycopg2 import extensions

logger = logging.getLogger(__name__)

WATCH_EVERY_SECONDS = 0.5


def message(*statements):
    """One Query message of `statements` (empty ones left out)."""
    return ";\n".join(statement.strip().rstrip(";") for statement in statements if statement and statement.strip())


def reads(cursor, *queries):
    """The rows of each of `queries` (SQL, or (SQL, parameters)), read in one statement: a list of row
    tuples per query, in each query's order. The values come back through JSON: text, numbers,
    booleans, arrays (as lists) and NULL keep their meaning; a timestamp comes back as its text."""
    cursor.execute(reads_statement(cursor, *queries))
    return answers(cursor.fetchone())


def reads_statement(cursor, *queries):
    """The one statement of reads(), to end a message of its own (its row: answers())."""
    parts = []
    for query in queries:
        sql, params = query if isinstance(query, tuple) else (query, None)
        if params is not None:
            sql = cursor.mogrify(sql, params).decode()
        parts.append(f"(SELECT coalesce(json_agg(q), '[]')::text FROM ({sql.strip().rstrip(';')}) AS q)")
    return "SELECT " + ",\n       ".join(parts)


def answers(row):
    """The rows of each query of reads_statement(), from its row."""
    return [json.loads(text, object_pairs_hook=_values) for text in row]


def _values(pairs):
    """A row of json_agg (an object, its columns in order, names repeated or not) as a tuple of its values."""
    return tuple(value for _name, value in pairs)


# --- counting ---------------------------------------------------------------------------------

class CountedCursor(extensions.cursor):
    """A cursor that counts each message it sends on its connection (CountedConnection)."""

    def execute(self, query, vars=None):
        self.connection.count(1)
        return super().execute(query, vars)

    def executemany(self, query, vars_list):
        vars_list = list(vars_list)
        self.connection.count(len(vars_list))
        return super().executemany(query, vars_list)

    def copy_expert(self, sql, file, size=8192):
        self.connection.count(2)
        return super().copy_expert(sql, file, size)


class CountedConnection(extensions.connection):
    """A psycopg2 connection that counts its round trips (module docstring): `round_trips`."""

    round_trips = 0

    def count(self, messages):
        """Count `messages` about to be sent, and the BEGIN psycopg2 sends before them when a
        transaction starts."""
        begins = not self.autocommit and self.info.transaction_status == extensions.TRANSACTION_STATUS_IDLE
        self.round_trips += messages + int(begins)

    def cursor(self, *args, **kwargs):
        kwargs.setdefault("cursor_factory", CountedCursor)
        return super().cursor(*args, **kwargs)

    def commit(self):
        self._count_end()
        super().commit()

    def rollback(self):
        self._count_end()
        super().rollback()

    def _count_end(self):
        if self.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE:
            self.round_trips += 1


def round_trips(connection):
    """Messages counted on `connection` (a CountedConnection; 0 for another)."""
    return getattr(connection, "round_trips", 0)


# --- measuring --------------------------------------------------------------------------------

def measure_ms(connection, times=3):
    """The round trip to the server now, in ms: the best of `times` `SELECT 1` (autocommit or not:
    a transaction left open is not the caller's problem here, it is rolled back only if this opened it)."""
    opened = not connection.autocommit and connection.info.transaction_status == extensions.TRANSACTION_STATUS_IDLE
    best = float("inf")
    with connection.cursor() as cursor:
        for _ in range(times):
            started = time.perf_counter()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            best = min(best, time.perf_counter() - started)
    if opened:
        connection.rollback()
    return best * 1000


# --- links that go silent ---------------------------------------------------------------------

class LinkSilent(psycopg2.OperationalError):
    """A message got no answer before its deadline: the connection was shut down. `backend_pid` is the
    server's session that may still be waiting on the other side of the silent link."""

    backend_pid = None


def end_abandoned(connection, pids):
    """On a new, direct `connection`, end the server's sessions of connections abandoned to a silent link
    (`pids`): one may still hold a transaction open, waiting for data that will never come. Never through
    a pooler (the pid would be the pooler's, shared)."""
    if pids:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid "
                           "WHERE pid <> pg_backend_pid()", [list(pids)])
            cursor.fetchall()


class _Watchdog(threading.Thread):
    """One thread per process: shuts down the socket of a connection whose message is past its deadline."""

    def __init__(self):
        super().__init__(name="round-trip watchdog", daemon=True)
        self.lock = threading.Lock()
        self.deadlines = {}  # token: (deadline, connection, what, seconds)
        self.fired = set()

    def run(self):
        while True:
            time.sleep(WATCH_EVERY_SECONDS)
            now = time.monotonic()
            with self.lock:
                late = [(token, entry) for token, entry in self.deadlines.items() if entry[0] <= now]
                for token, _ in late:
                    del self.deadlines[token]
                    self.fired.add(token)
            if not late:
                continue
            _silenced(now)
            with self.lock:  # the others waiting through the same link are waiting for nothing
                late += [(token, entry) for token, entry in self.deadlines.items()]
                for token, _ in late:
                    self.deadlines.pop(token, None)
                    self.fired.add(token)
            for _token, (_deadline, connection, what, seconds) in late:
                logger.warning("%s: no answer from the database; the link went silent, closing the connection",
                               what)
                shut_down(connection)


_watchdog = None
_watchdog_lock = threading.Lock()
_last_silence = float("-inf")


def _silenced(when):
    global _last_silence
    _last_silence = when


def stale(opened_at):
    """True when a link went silent after a connection was opened at `opened_at` (time.monotonic()): it
    went silent for that connection too, however idle it looks."""
    return opened_at <= _last_silence


def _the_watchdog():
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = _Watchdog()
            _watchdog.start()
        return _watchdog


def shut_down(connection):
    """Shut the socket of `connection` (psycopg2) down under libpq's feet: the statement waiting on it
    fails at once as a lost connection. Nothing is sent to the server."""
    try:
        duplicate = socket.socket(fileno=os.dup(connection.fileno()))
    except (OSError, psycopg2.Error):
        return  # already closed
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more
    finally:
        duplicate.close()


@contextmanager
def deadline(connection, seconds, what="a statement"):
    """Within the block, `connection` must answer within `seconds` (None: no deadline); else its socket
    is shut down and the block's statement raises LinkSilent (a psycopg2.OperationalError)."""
    if seconds is None:
        yield
        return
    watchdog, token = _the_watchdog(), object()
    pid = getattr(getattr(connection, "info", None), "backend_pid", None)
    with watchdog.lock:
        watchdog.deadlines[token] = (time.monotonic() + seconds, connection, what, seconds)
    try:
        yield
    except psycopg2.Error as exc:
        with watchdog.lock:
            fired = token in watchdog.fired
        if fired:
            silent = LinkSilent(f"{what}: no answer from the database within {seconds:.0f} s (the link went silent); "
                                f"the connection was closed ({' '.join(str(exc).split())})")
            silent.backend_pid = pid
            raise silent from exc
        raise
    finally:
        with watchdog.lock:
            watchdog.deadlines.pop(token, None)
            watchdog.fired.discard(token)
