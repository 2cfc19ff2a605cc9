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
- **Lock timeouts and retries**: `LOCK_NOT_AVAILABLE` and friends, `is_lock_timeout`, and
  `retrying` (tenacity) for work that a lost connection or a busy table interrupts.
- **Sizes and names**: `parse_size` and `human_bytes`, `quote_ident` and `quote_literal`,
  `index_valid`.

Nothing here imports the project's apps: settings.py, `segments` and `benchmark` use it.
"""
import logging
import re

import psycopg2
from psycopg2 import errors

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


# --- retries ----------------------------------------------------------------------------------

def retrying(*, attempts, wait, on=TRANSIENT_ERRORS, sleep=None, before_retry=None, what="the database work"):
    """A tenacity Retrying for work that a lost connection or a busy table interrupts: `attempts`
    tries in all (None: without end), `wait(attempt number)` seconds before each retry, after the
    exceptions `on` only; one log line per retry (never a traceback); the last error is raised when
    the tries are spent. `before_retry()` runs before each wait (to close a broken connection, say),
    `sleep(seconds)` waits (to be woken by a stop request, say)."""
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
        retry=tenacity.retry_if_exception_type(on),
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


def private_connection(using="default", purpose="work", settings=None, application_name=None, autocommit=True):
    """A new psycopg2 connection for work that needs a session of its own (`purpose` names it in
    errors), with `settings` ({name: value}) given as startup options, so that no SET is ever sent.

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
    connection = private.get_new_connection(params)
    connection.autocommit = autocommit
    try:
        _check_settings(connection, settings or {}, purpose)
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


def _check_settings(connection, wanted, purpose):
    """PoolerRefused when the server did not take the startup options (a proxy dropped them).

    Each setting's current value is compared with the value asked for as the server shows it
    (`set_config(..., true)` in the same statement, which ends with it: nothing stays set)."""
    for name, value in wanted.items():
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting(%s), set_config(%s, %s, true)", [name, name, str(value)])
            got, asked = cursor.fetchone()
        if not connection.autocommit:
            connection.rollback()
        if got != asked:
            raise PoolerRefused(
                f"{purpose} asked for {name} = {value} as a startup option and the server reports {got}: "
                f"something between here and the server drops startup options. Set {DIRECT_URL_SETTING} to a "
                "direct connection. Nothing was done."
            )
