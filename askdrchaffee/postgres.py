"""The PostgreSQL chores of the project, in one place.

- **Settings scoped to a transaction** (`set_local`, `local_settings`). A deployment often reaches
  its database through a pooler in transaction mode (PgBouncer, Supabase's pooler), which hands
  each transaction to whichever server connection is free: a session-level `SET` would stay on
  that server connection and be seen by the next client that gets it. So the project never sets
  a session setting on a shared connection; what a transaction needs, it sets for itself.
- **Private connections** (`private_connection`) for the work that needs a session of its own:
  `CREATE INDEX CONCURRENTLY` (its memory, workers and timeouts, which cannot be scoped to a
  transaction because the build is not allowed in one) and `LISTEN`. Their settings are startup
  options of a connection opened for that work and closed after it, never a `SET` on a shared
  one. Through a pooler the startup options would be dropped (PgBouncer ignores them), so a
  private connection goes to DATABASE_DIRECT_URL when the usual route is a pooler, and refuses,
  naming that setting, when it is not given.
- **Poolers** (`behind_pooler`): a connection goes through a pooler or proxy when the server's own
  port is not the one connected to (PgBouncer listens on 6432, Supabase's pooler on 6543, the
  server on 5432).
- **Lock timeouts and retries**: `LOCK_NOT_AVAILABLE` and friends, `is_lock_timeout`, `retrying`
  (tenacity) for work that a lost connection or a busy table interrupts, and `with_lock_retries`
  for a step that needs a lock the application's writes would queue behind: a short lock_timeout,
  tried again with backoff, so that no write waits longer than one short attempt (GitLab's lock
  retries), and the sessions that held the lock named when it gives up (`lock_holders`).
- **Connections that cannot succeed as configured** (`connection_refusal`): a certificate from
  another CA or for another host, TLS required but not asked for, a wrong password or host. Each
  becomes one line naming the setting to fix (the commands print it, the admin's log shows it), and
  is never retried.
- **Reads side by side** (`SideBySide`): read-only parts of a report run at once, on connections
  of their own, opened while the caller reads what the parts depend on: far from the database the
  report costs its longest part's round trips, not their sum.
- **Sizes and names**: `parse_size` and `human_bytes`, `quote_ident` and `quote_literal`,
  `index_valid`.

Nothing here imports the project's apps: settings.py, `segments` and `benchmark` use it.
"""
import logging
import os
import queue
import random
import re
import threading
import time
from datetime import timedelta

import psycopg2
from psycopg2 import errors

from askdrchaffee.round_trips import CountedConnection

logger = logging.getLogger(__name__)

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
TRANSIENT_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
DIRECT_URL_SETTING = "DATABASE_DIRECT_URL"


# --- sizes and names --------------------------------------------------------------------------

SIZE_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}


def parse_size(raw):
    """Bytes of a PostgreSQL memory size ("512MB", "2GB"; no unit means kB, as PostgreSQL reads it);
    ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(raw))
    unit = (match[2] or "kB").lower() if match else None
    if unit not in SIZE_UNITS:
        raise ValueError(raw)
    return int(match[1]) * SIZE_UNITS[unit]


def human_bytes(value):
    """A byte count for people: "512 bytes", "1.5 kB", "2.0 MB", "273 MB", "2.6 GB" (binary units: one
    decimal under ten of a unit, none above, one always for GB; "unknown" for None)."""
    if value is None:
        return "unknown"
    if abs(value) < 1024:
        return f"{value:,} bytes"
    for unit in ("kB", "MB", "GB"):
        value /= 1024
        if abs(value) < 1024 or unit == "GB":
            return f"{value:,.1f} {unit}" if abs(value) < 10 or unit == "GB" else f"{value:,.0f} {unit}"


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text):
    return "'" + text.replace("'", "''") + "'"


def index_valid(cursor, name):
    """True if index `name` exists and is valid, False if it exists but is INVALID, else None."""
    cursor.execute(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = %s AND pg_catalog.pg_table_is_visible(c.oid)",
        [name],
    )
    row = cursor.fetchone()
    return None if row is None else row[0]


# --- settings scoped to a transaction ---------------------------------------------------------

def set_local(cursor, **values):
    """`set_config(name, value, true)` for each setting (dots in names written as `__`), in one
    statement; their values before, in order. They end with the caller's transaction."""
    if not values:
        return []
    names = [name.replace("__", ".") for name in values]
    reads = ", ".join("current_setting(%s, true)" for _ in names)
    sets = ", ".join("set_config(%s, %s, true)" for _ in names)
    params = names + [item for name, value in zip(names, values.values()) for item in (name, str(value))]
    cursor.execute(f"SELECT {reads}, {sets}", params)
    return list(cursor.fetchone()[: len(names)])


class local_settings:
    """`with local_settings(cursor, lock_timeout="5s"):` sets the values for the rest of the
    block's statements and puts the previous values back after it (for a caller whose transaction
    goes on afterwards; a released savepoint keeps SET LOCAL values)."""

    def __init__(self, cursor, **values):
        self.cursor, self.values = cursor, values

    def __enter__(self):
        self.previous = set_local(self.cursor, **self.values)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            back = {name: value for name, value in zip(self.values, self.previous) if value is not None}
            set_local(self.cursor, **back)
        return False


# --- lock timeouts ----------------------------------------------------------------------------

def pgcode(exc):
    """The SQLSTATE of a psycopg2 error, or of the one a Django DatabaseError wraps; None otherwise."""
    return getattr(exc, "pgcode", None) or getattr(getattr(exc, "__cause__", None), "pgcode", None)


def is_lock_timeout(exc):
    return pgcode(exc) == LOCK_NOT_AVAILABLE or isinstance(exc, errors.LockNotAvailable)


# --- sessions, as reported to people ----------------------------------------------------------

QUERY_SHOWN = 200  # characters of another session's query that are reported


def shown_query(query):
    """A session's query as reported: whitespace collapsed, cut at QUERY_SHOWN characters."""
    query = " ".join((query or "").split())
    return query[:QUERY_SHOWN] + "..." if len(query) > QUERY_SHOWN else query


def describe_session(who, state, seconds, application, query):
    """"pid 123 (idle in transaction, open 0:00:15, psql); its query: '...'" for `who` ("pid 123"),
    a session of pg_stat_activity (`seconds`: how long its transaction has been open, None when
    unknown)."""
    age = "" if seconds is None else f", open {timedelta(seconds=int(seconds))}"
    query = shown_query(query)
    shown = f"; its query: {query!r}" if query else ""
    return f"{who} ({state or 'state unknown'}{age}, {application or 'no application_name'}){shown}"


# --- lock retries ----------------------------------------------------------------------------

LOCK_RETRY_FIRST_TIMEOUT_MS = 100  # the first attempt's lock_timeout; doubled each attempt up to the cap
LOCK_RETRY_FIRST_SLEEP_SECONDS = 0.2  # the first pause between attempts; x1.5 each attempt up to the most
LOCK_RETRY_MOST_SLEEP_SECONDS = 3.0

# The sessions holding a lock on %(table)s, oldest transaction first: what a step waited behind.
LOCK_HOLDERS_SQL = """
    SELECT 'pid ' || a.pid, a.state, extract(epoch FROM now() - a.xact_start), a.application_name,
           left(a.query, %(shown)s)
    FROM pg_stat_activity a
    WHERE a.pid <> pg_backend_pid() AND a.pid IN (
        SELECT l.pid FROM pg_locks l WHERE l.relation = to_regclass(%(table)s) AND l.granted)
    ORDER BY a.xact_start NULLS LAST LIMIT 3
"""


class LockNotTaken(Exception):
    """A step gave up waiting for a lock after its retries; it changed nothing."""


def lock_holders(cursor, table):
    """describe_session() of the sessions holding a lock on `table`, oldest transaction first."""
    cursor.execute(LOCK_HOLDERS_SQL, {"table": table, "shown": QUERY_SHOWN + 1})
    return [describe_session(*row) for row in cursor.fetchall()]


def lock_retry_settings():
    """(the longest lock_timeout of one attempt in ms, the seconds a step keeps trying): the
    settings MIGRATION_LOCK_TIMEOUT and MIGRATION_LOCK_RETRY_SECONDS, read at each use."""
    from django.conf import settings

    cap = parse_duration_ms(settings.MIGRATION_LOCK_TIMEOUT)
    return max(1, cap), float(settings.MIGRATION_LOCK_RETRY_SECONDS)


def parse_duration_ms(raw):
    """Milliseconds of a PostgreSQL duration ("500ms", "2s", "1min"; no unit means ms); ValueError else."""
    units = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000, "": 1}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(raw).lower())
    if not match or match[2] not in units:
        raise ValueError(raw)
    return int(float(match[1]) * units[match[2]])


def lock_attempts(cap_ms, patience_seconds):
    """(attempt number, its lock_timeout in ms, the pause after it if it fails) for as long as
    `patience_seconds` allows counting the attempts' own waits; the first attempt always."""
    spent, attempt = 0.0, 0
    while True:
        attempt += 1
        timeout = min(cap_ms, LOCK_RETRY_FIRST_TIMEOUT_MS * 2 ** (attempt - 1))
        pause = min(LOCK_RETRY_MOST_SLEEP_SECONDS, LOCK_RETRY_FIRST_SLEEP_SECONDS * 1.5 ** (attempt - 1))
        pause *= random.uniform(0.8, 1.2)  # two steps retrying together do not stay in step
        yield attempt, timeout, pause
        spent += timeout / 1000 + pause
        if spent >= patience_seconds:
            return


def with_lock_retries(attempt, *, what, holders, sleep=time.sleep):
    """attempt(lock_timeout) until it is not stopped by a lock timeout; its result.

    `attempt` runs one whole transaction that sets the lock_timeout it is given ("100ms") for
    itself (`SET LOCAL`) before taking its locks, and rolls back entirely when the lock times out:
    the application's writes, queued behind the waiting lock request, wait at most that long.
    Between attempts they go on. `holders()` names the sessions that held the lock (after the
    rollback). After MIGRATION_LOCK_RETRY_SECONDS, LockNotTaken naming them; nothing was changed."""
    cap, patience = lock_retry_settings()
    started = time.monotonic()
    for number, timeout, pause in lock_attempts(cap, patience):
        try:
            return attempt(f"{timeout}ms")
        except Exception as exc:
            if not is_lock_timeout(exc):
                raise
            held_by = holders()
        who = "; ".join(held_by) or "a session that has ended since"
        logger.warning("%s: attempt %d timed out after %d ms waiting for a lock held by %s; trying again in %.1f s",
                       what, number, timeout, who, pause)
        last = who
        if time.monotonic() - started + pause >= patience:
            break
        sleep(pause)
    raise LockNotTaken(
        f"{what} gave up after {number} attempts in {time.monotonic() - started:.0f} s, each waiting at most "
        f"{cap} ms for its lock (so the application's writes never queued longer behind it): held by {last}. "
        "Nothing was changed. Run it again once that transaction has ended, or give it more time with "
        "MIGRATION_LOCK_RETRY_SECONDS."
    )


# --- connections that cannot succeed as configured --------------------------------------------

# libpq's words when connecting cannot succeed until a setting changes (retrying cannot help), with
# what they mean and the fix. {url} is DATABASE_URL or DATABASE_DIRECT_URL (the one whose host
# failed), {sslmode} and {sslrootcert} its values; the other names are the message's own.
REFUSALS = (
    (r"certificate verify failed",
     "the server's certificate is not signed by the CA in sslrootcert={sslrootcert} (certificate verify failed)",
     "Set sslrootcert in {url} to the CA that signed it"),
    (r'root certificate file "(?P<file>[^"]*)" does not exist',
     "sslmode={sslmode} checks the server's certificate, and sslrootcert={file} does not exist",
     "Set sslrootcert in {url} to the file of the CA that signed it (sslrootcert=system: the system's CAs)"),
    (r'server certificate for "(?P<name>[^"]*)".* does not match host name "(?P<host>[^"]*)"',
     "the server's certificate is for {name}, not for {host} (sslmode=verify-full checks the name)",
     "Use in {url} the host name its certificate names, or set sslmode=verify-ca there (it checks the CA only)"),
    (r'no pg_hba\.conf entry for host "(?P<client>[^"]*)", user "(?P<user>[^"]*)", database "(?P<db>[^"]*)", '
     r"SSL (?:encryption|on)",
     "the server admits no connection from {client} as user {user} to database {db} (no pg_hba.conf entry)",
     "Check the user and database name in {url}, and that the server accepts connections from this address"),
    (r"no pg_hba\.conf entry for .*, (?:no encryption|SSL off)",
     "the server requires TLS and sslmode={sslmode} does not ask for it (no pg_hba.conf entry without TLS)",
     "Set sslmode=require in {url} (or verify-full with sslrootcert)"),
    (r"server does not support SSL, but SSL was required",
     "the server does not speak TLS and sslmode={sslmode} requires it",
     "Check the host and port in {url} (a managed database speaks TLS), or set sslmode=prefer there"),
    (r'password authentication failed for user "(?P<user>[^"]*)"',
     "the server refused the password of user {user}",
     "Set the user's password in {url} (with its special characters percent-encoded)"),
    (r"no password supplied",
     "the server asks for a password and {url} has none",
     "Add it to {url}: postgresql://USER:PASSWORD@HOST/NAME"),
    (r'could not translate host name "(?P<host>[^"]*)" to address: '
     r"(?:Name or service not known|No address associated with hostname|nodename nor servname provided)",
     "no host is named {host}",
     "Correct the host in {url}"),
    (r'FATAL: database "(?P<db>[^"]*)" does not exist',
     "the server has no database {db}",
     "Correct the database name in {url}"),
    (r'FATAL: role "(?P<user>[^"]*)" does not exist',
     "the server has no user {user}",
     "Correct the user in {url}"),
)


def connection_refusal(exc):
    """The one line for a failure to connect (psycopg2's OperationalError, or Django's wrapping one)
    that only a change of settings can mend (REFUSALS): what happened, the setting to change, and
    that nothing was written. None for any other error: a server restarting or a link down may pass."""
    error = exc if isinstance(exc, psycopg2.OperationalError) else getattr(exc, "__cause__", None)
    if not isinstance(error, psycopg2.OperationalError) or error.pgcode is not None:
        return None  # an error of a statement, not of connecting
    message = " ".join(str(error).split())
    for pattern, what, fix in REFUSALS:
        found = re.search(pattern, message)
        if found:
            values = {**_url_settings(message), **found.groupdict()}
            return (f"Cannot connect to the database: {what.format(**values)}. {fix.format(**values)}. "
                    "Nothing was written.")
    return None


def _url_settings(message):
    """{url, sslmode, sslrootcert} of the URL that failed: DATABASE_DIRECT_URL when libpq's message
    names its host and port ('connection to server at "HOST" (ADDRESS), port PORT failed') and not
    DATABASE_URL's; DATABASE_URL otherwise."""
    from django.conf import settings

    default = settings.DATABASES.get("default", {}) if settings.configured else {}
    direct = getattr(settings, "DATABASE_DIRECT", None) if settings.configured else None
    at = re.search(r'connection to server at "([^"]*)"(?: \([^)]*\))?, port (\d+) failed', message)
    url, options = "DATABASE_URL", default.get("OPTIONS", {})
    if direct and at and _reaches(direct, *at.groups()) and not _reaches(default, *at.groups()):
        url, options = DIRECT_URL_SETTING, {**options, **direct.get("OPTIONS", {})}
    return {"url": url, "sslmode": options.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer",
            "sslrootcert": (options.get("sslrootcert") or os.environ.get("PGSSLROOTCERT")
                            or "~/.postgresql/root.crt")}


def _reaches(database, host, port):
    """Whether `database` (a DATABASES entry) connects to `host` and `port`."""
    return ((database.get("OPTIONS", {}).get("host") or database.get("HOST")) == host
            and str(database.get("PORT") or 5432) == port)


class ConnectionRefusalInOneLine(logging.Filter):
    """A logging filter: a record whose error is a connection refusal (connection_refusal) becomes
    its one line, without the traceback (django.request's record of a failed admin page)."""

    def filter(self, record):
        line = connection_refusal(record.exc_info[1]) if record.exc_info else None
        if line is not None:
            record.msg, record.args, record.exc_info, record.exc_text = line, (), None, None
        return True


# --- retries ----------------------------------------------------------------------------------

def retrying(*, attempts, wait, on=TRANSIENT_ERRORS, sleep=None, before_retry=None, what="the database work"):
    """A tenacity Retrying for work that a lost connection or a busy table interrupts: `attempts`
    tries in all (None: without end), `wait(attempt number)` seconds before each retry, after the
    exceptions `on` only, never after a connection refusal (a setting to fix: connection_refusal); one
    log line per retry (never a traceback); the last error is raised when the tries are spent.
    `before_retry()` runs before each wait (to close a broken connection, say), `sleep(seconds)`
    waits (to be woken by a stop request, say)."""
    import tenacity

    def log(state):
        error = state.outcome.exception()
        shown = f"{state.attempt_number}/{attempts}" if attempts else f"{state.attempt_number}"
        logger.warning("%s failed (attempt %s): %s; retrying in %.1f s", what, shown, " ".join(str(error).split()),
                       state.upcoming_sleep)
        if before_retry is not None:
            before_retry()

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts) if attempts else tenacity.stop_never,
        wait=lambda state: wait(state.attempt_number),
        retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, on) and connection_refusal(exc) is None),
        before_sleep=log,
        sleep=sleep or tenacity.nap.sleep,
        reraise=True,
    )


# --- poolers and private connections ----------------------------------------------------------

class PoolerRefused(Exception):
    """The work needs a session of its own and the usual route is a pooler; nothing was done."""


def behind_pooler(connection):
    """(True, why) when `connection` (psycopg2) reaches the server through a pooler or a proxy:
    the server's own port is not the port connected to; (False, None) otherwise."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('port')::int")
        server_port = cursor.fetchone()[0]
    connected = int(connection.info.port)
    if connected == server_port:
        return False, None
    return True, f"connected to port {connected}, while the server listens on {server_port}"


def connection_params(using="default", direct=False):
    """libpq parameters for a new connection to database `using` (Django's alias); with `direct`,
    over DATABASE_DIRECT_URL when it is set (the same database, reached without the pooler)."""
    from django.conf import settings
    from django.db import connections

    wrapper = connections[using]
    private = type(wrapper)(dict(wrapper.settings_dict), using)
    direct_settings = getattr(settings, "DATABASE_DIRECT", None) if direct else None
    if direct_settings:
        for key in ("HOST", "PORT", "USER", "PASSWORD"):
            private.settings_dict[key] = direct_settings.get(key) or ""
        private.settings_dict["OPTIONS"] = {**private.settings_dict.get("OPTIONS", {}),
                                            **direct_settings.get("OPTIONS", {})}
    return private, private.get_connection_params()


def private_connection(using="default", purpose="work", settings=None, application_name=None, autocommit=True,
                       checked=True):
    """A new psycopg2 connection for work that needs a session of its own (`purpose` names it in
    errors), with `settings` ({name: value}) given as startup options, so that no SET is ever sent;
    they are checked at once (settings_check()), or, with `checked` False, nothing is sent yet: the
    check is the connection's `first_message`, for the caller to send before or with its first
    statement (a round trip fewer), and settings_refusal() makes the error it may fail with a
    PoolerRefused.

    It goes over DATABASE_DIRECT_URL when that is set. Otherwise, when the usual route is a pooler
    or proxy (`behind_pooler`), it refuses with PoolerRefused, naming that setting: a pooler drops
    startup options, and would hand the session's statements to different server connections.
    """
    from django.conf import settings as django_settings

    direct = bool(getattr(django_settings, "DATABASE_DIRECT", None))
    private, params = connection_params(using, direct=direct)
    if not direct:
        _refuse_a_pooler(private, dict(params), purpose)
    options = " ".join(f"-c {name}={_option_value(value)}" for name, value in (settings or {}).items())
    if options:
        params["options"] = f"{params.get('options', '')} {options}".strip()
    if application_name:
        params["application_name"] = application_name[:63]
    params["connection_factory"] = CountedConnection
    connection = private.get_new_connection(params)
    connection.autocommit = autocommit
    check = settings_check(settings or {}, purpose)
    if not checked:
        connection.first_message = check
        return connection
    try:
        if check:
            _send_check(connection, check)
    except BaseException:
        connection.close()
        raise
    return connection


def _refuse_a_pooler(private, params, purpose):
    """PoolerRefused when the usual route (`params`, without startup options: a default PgBouncer
    refuses those outright) goes through a pooler or proxy."""
    probe = private.get_new_connection(params)
    try:
        pooled, why = behind_pooler(probe)
    finally:
        probe.close()
    if pooled:
        raise PoolerRefused(
            f"{purpose} needs a database session of its own, and DATABASE_URL goes through a pooler or "
            f"proxy ({why}). A pooler in transaction mode (PgBouncer, Supabase's pooler) hands each "
            "transaction to another server connection and drops session settings. Set "
            f"{DIRECT_URL_SETTING} to a direct connection to the same database (on Supabase, port 5432 of "
            "the database host; for a plain port forward, the same URL as DATABASE_URL). Nothing was done."
        )


def _option_value(value):
    text = str(value)
    if re.fullmatch(r"[\w.:/-]*", text) and text:
        return text
    raise ValueError(f"startup option value {text!r}: only letters, digits and . : / - _ are allowed")


SETTINGS_NOT_TAKEN = "AD001"  # the SQLSTATE settings_check() fails with


def settings_check(wanted, purpose):
    """One statement that fails (SQLSTATE SETTINGS_NOT_TAKEN, its message the PoolerRefused's) when the
    server did not take the startup options `wanted` ({name: value}): a proxy dropped them. "" without
    any. It changes nothing, and may go in a message with other statements.

    Each setting's current value is compared with the value asked for as the server shows it
    (`set_config(..., true)`: local to the message's transaction, and the same value when it passes)."""
    checks = []
    for name, value in wanted.items():
        refusal = (f"{purpose} asked for {name} = {value} as a startup option and the server reports {{}}: "
                   f"something between here and the server drops startup options. Set {DIRECT_URL_SETTING} to a "
                   "direct connection. Nothing was done.").replace("%", "%%").replace("{}", "%s")
        checks.append(f"""
    got := current_setting({quote_literal(name)});
    IF got IS DISTINCT FROM set_config({quote_literal(name)}, {quote_literal(str(value))}, true) THEN
        RAISE EXCEPTION USING ERRCODE = '{SETTINGS_NOT_TAKEN}', MESSAGE = format({quote_literal(refusal)}, got);
    END IF;""")
    if not checks:
        return ""
    return "DO $check$\nDECLARE got text;\nBEGIN" + "".join(checks) + "\nEND\n$check$"


def settings_refusal(exc):
    """The PoolerRefused of a failed settings_check() (`exc`, a psycopg2 error); None for any other error."""
    if getattr(exc, "pgcode", None) != SETTINGS_NOT_TAKEN:
        return None
    return PoolerRefused(exc.diag.message_primary)


def _send_check(connection, check):
    """settings_check()'s statement `check`, alone: PoolerRefused when it fails."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(check)
    except psycopg2.Error as exc:
        refusal = settings_refusal(exc)
        if refusal is None:
            raise
        raise refusal from None
    finally:
        if not connection.autocommit and not connection.closed:
            connection.rollback()


# --- reads side by side ------------------------------------------------------------------------

def _begun_by_the_first_statement():
    """An execute wrapper that sends a REPEATABLE READ read-only BEGIN with the first statement."""
    begun = []

    def wrapper(execute, sql, params, many, context):
        if not begun and not many:
            begun.append(True)
            sql = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;\n" + sql
        return execute(sql, params, many, context)
    return wrapper


class SideBySide:
    """Read-only parts run side by side: each in a thread of its own, on a connection of its own (Django's,
    per thread), in a REPEATABLE READ read-only transaction of its own (its reads agree with each other;
    the parts' snapshots are taken within a round trip of each other). No part waits for another, and
    none holds a connection while waiting for another (behind a pooler, a pool of one connection serves
    them in turn).

    Its `count` threads open their connections as soon as it is made, and wait for the parts: far from
    the database, what the caller reads meanwhile (the parts it will run depend on it) costs no round
    trip besides the connections'. With `count` 0, or inside the caller's transaction (which may have
    written what other sessions would not see), the parts run one after the other on the caller's
    connection. A context manager: its end closes the connections no part used."""

    def __init__(self, using, count):
        from django.db import connections

        self.using, self.threads, self.jobs = using, [], queue.Queue()
        self.inline = not count or connections[using].in_atomic_block
        for _ in range(0 if self.inline else count):
            self._start()

    def _start(self):
        thread = threading.Thread(target=self._serve, name="read side by side", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _serve(self):
        from django.db import connections

        try:
            try:
                connections[self.using].ensure_connection()
            except Exception:  # the part this thread runs meets it again, and raises it to the caller
                pass
            job = self.jobs.get()
            if job is not None:
                job()
        finally:  # the part's transaction, read only, ends with its connection
            connections[self.using].close()

    def run(self, parts):
        """{name: part()}; a part's failure raised here, once all have ended."""
        from django.db import connections

        if self.inline or len(parts) < 2:
            return {name: part() for name, part in parts.items()}
        results, failures = {}, []

        def job(name, part):
            def run():
                # The thread's connection is in autocommit: its transaction begins with its first statement,
                # in the same message, and ends when the connection closes.
                try:
                    with connections[self.using].execute_wrapper(_begun_by_the_first_statement()):
                        results[name] = part()
                except BaseException as exc:  # the caller's thread raises it
                    failures.append(exc)
            return run

        while len(self.threads) < len(parts):
            self._start()
        for name, part in parts.items():
            self.jobs.put(job(name, part))
        self.close()
        if failures:
            raise failures[0]
        return results

    def close(self):
        """Let each thread end (those without a part close their connection), and wait for them."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
