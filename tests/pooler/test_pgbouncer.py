"""The switch through a real PgBouncer in transaction mode, beside an application on the same pool.

A pooler in transaction mode hands each transaction to whichever server connection is free and
resets nothing between clients: a session-level SET, a LISTEN, a session advisory lock or
`session_replication_role = replica` left on a server connection reaches the next client that
gets it. The project's rule (askdrchaffee/postgres.py) is that what a transaction needs is set for
that transaction only, and that what needs a session of its own goes over DATABASE_DIRECT_URL or
is refused. These tests hold it to that:

- the README's runbook, each step a `manage.py` process whose DATABASE_URL is the pooler, with a
  follower embedding arrivals, while an application client on the same pool reads the settings
  the switch uses in every transaction (thousands of them) and writes as an application does:
  its trigger must fire and its foreign key must hold in every one;
- a control: a client that does leave a session setting behind is seen by the same poller
  within seconds, so that "never seen" above means something;
- without DATABASE_DIRECT_URL, the index build refuses before changing anything, naming it, and
  the follower polls instead of listening, and says so.

Run them alone with `pytest tests/pooler` (as root: PgBouncer runs as the data directory's owner).
"""
import random
import signal
import threading
import time
from collections import Counter, defaultdict

import psycopg2
import pytest
from django.core.management import call_command
from django.db import connection
from psycopg2 import errors

from segments.schema import embedding_schema
from segments.switch.backfill import count_pending
from tests import readme
from tests.conftest import manage

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STEP_SECONDS = 300

# Session state the switch sets for itself (each only for its own transaction, or on a connection
# of its own), with settings it never touches for comparison. Read in every transaction of the
# application, as its first statement; each must equal what a fresh session gets.
SETTINGS = ("session_replication_role", "lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout",
            "maintenance_work_mem", "max_parallel_maintenance_workers", "synchronous_commit", "search_path",
            "work_mem", "enable_indexscan", "enable_seqscan", "default_transaction_isolation", "TimeZone",
            "hnsw.ef_search", "hnsw.iterative_scan")
# pgvector's settings exist in a server process once its library is loaded there; before that
# current_setting(name, true) is NULL, which is no leak.
LOADED_LATER = {"hnsw.ef_search", "hnsw.iterative_scan"}
# What else a session can leave on a server connection.
SESSION_STATE = {
    "listening_channels": "(SELECT count(*) FROM pg_listening_channels())",
    "session_advisory_locks": "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())",
    "prepared_statements": "(SELECT count(*) FROM pg_prepared_statements)",
    "open_cursors": "(SELECT count(*) FROM pg_cursors)",
    "temporary_tables": "(SELECT string_agg(relname, ', ' ORDER BY relname) FROM pg_class "
                        "WHERE relnamespace = pg_my_temp_schema())",
}
NAMES = SETTINGS + tuple(SESSION_STATE)
READ_STATE = ("SELECT pg_backend_pid(), "
              + ", ".join([f"current_setting('{name}', true)" for name in SETTINGS] + list(SESSION_STATE.values())))


def server_defaults(direct_url):
    """The state a fresh session gets, read over the direct socket ({name: value})."""
    with psycopg2.connect(direct_url) as fresh:
        with fresh.cursor() as cursor:
            cursor.execute("SELECT '[1]'::vector")  # load pgvector, for its settings' defaults
            cursor.execute(READ_STATE)
            values = cursor.fetchone()[1:]
    fresh.close()
    return dict(zip(NAMES, values))


def leaked(values, defaults):
    """{name: value} of what differs from a fresh session's."""
    return {name: value for name, value in zip(NAMES, values)
            if value != defaults[name] and not (value is None and name in LOADED_LATER)}


class Application(threading.Thread):
    """A client of the pooler in a tight loop of short transactions. Each transaction first reads
    the session state (READ_STATE) and compares it with a fresh session's; every `write_every`-th
    iteration also writes as the application does, one kind of write after another:

    - `touch`: UPDATE of a segment's speaker_label, whose BEFORE UPDATE trigger (the
      application's own) must stamp updated_at = now();
    - `bookmark`: a row in the application's table with a FOREIGN KEY to segments;
    - `bad_bookmark`: the same with a segment id that does not exist, which must be refused;
    - `insert` and `edit` (while `text_writes` is set, at most every `text_every` seconds): a new
      segment, a segment's text corrected (with the trigger's check).

    Under session_replication_role = replica neither the trigger nor the foreign key would hold.
    """

    KINDS = ("touch", "bookmark", "bad_bookmark", "insert", "edit")

    def __init__(self, url, defaults, *, write_every=4, text_every=0.5):
        super().__init__(name="application", daemon=True)
        self.url, self.defaults = url, defaults
        self.write_every, self.text_every = write_every, text_every
        self.stop, self.text_writes = threading.Event(), threading.Event()
        self.text_writes.set()
        self.polls = 0
        self.server_pids = set()
        self.step = "start"  # what the switch is doing (set by the test)
        self.seen = Counter()  # name: transactions that saw it differ from a fresh session
        self.first_seen = {}  # name: (poll number, server pid, value, step)
        self.values_seen = defaultdict(set)  # name: the values seen (a few)
        self.writes = Counter()
        self.trigger_missed = 0
        self.bad_fk_accepted = 0
        self.errors = []
        self.ids = []
        self.updated, self.inserted = set(), set()  # segments this client wrote
        self._rng = random.Random(7)
        self._last_text = 0.0
        self._kind = self._text_kind = 0

    def run(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.url, application_name="application")
                    with conn, conn.cursor() as cursor:
                        cursor.execute("SELECT id FROM segments ORDER BY id")
                        self.ids = [row[0] for row in cursor.fetchall()]
                with conn, conn.cursor() as cursor:
                    self._check(cursor)
                if self.polls % self.write_every == 0:
                    self._write(conn)
            except Exception as exc:  # noqa: BLE001 (every failure of the application is counted)
                self.errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
                if conn is not None:
                    conn.close()
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def _check(self, cursor):
        cursor.execute(READ_STATE)
        pid, *values = cursor.fetchone()
        self.polls += 1
        self.server_pids.add(pid)
        for name, value in leaked(values, self.defaults).items():
            self.seen[name] += 1
            self.first_seen.setdefault(name, (self.polls, pid, value, self.step))
            if len(self.values_seen[name]) < 10:
                self.values_seen[name].add(value)

    def _write(self, conn):
        kind = self._next_kind()
        if kind is None:
            return
        segment = self._rng.choice(self.ids)
        try:
            with conn, conn.cursor() as cursor:
                self._check(cursor)
                if kind == "touch":
                    cursor.execute("UPDATE segments SET speaker_label = %s WHERE id = %s RETURNING updated_at = now()",
                                   [self._rng.choice(["Chaffee", "GUEST"]), segment])
                    self._trigger_fired(cursor)
                    self.updated.add(segment)
                elif kind == "edit":
                    cursor.execute("UPDATE segments SET text = text || ' (corrected)' WHERE id = %s "
                                   "RETURNING updated_at = now()", [segment])
                    self._trigger_fired(cursor)
                    self.updated.add(segment)
                elif kind == "insert":
                    cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES "
                                   "('app-video', %s, %s, %s) RETURNING id",
                                   [self.polls, self.polls + 1, f"segment {self.polls} about fasting and red meat"])
                    self.ids.append(cursor.fetchone()[0])
                    self.inserted.add(self.ids[-1])
                elif kind == "bookmark":
                    cursor.execute("INSERT INTO app_bookmark (segment_id, note) VALUES (%s, 'saved')", [segment])
                elif kind == "bad_bookmark":
                    # thousands of refusals: kept out of the server's log, for this transaction only
                    cursor.execute("SELECT set_config('log_min_messages', 'fatal', true), "
                                   "set_config('log_min_error_statement', 'panic', true)")
                    cursor.execute("SAVEPOINT bad")
                    try:
                        cursor.execute("INSERT INTO app_bookmark (segment_id, note) VALUES (-1, 'no such segment')")
                    except errors.ForeignKeyViolation:
                        cursor.execute("ROLLBACK TO SAVEPOINT bad")
                    else:
                        self.bad_fk_accepted += 1
                        cursor.execute("ROLLBACK TO SAVEPOINT bad")
            self.writes[kind] += 1
        except Exception:
            self.writes[f"{kind} failed"] += 1
            raise

    def _next_kind(self):
        kind = ("touch", "bookmark", "bad_bookmark", "text")[self._kind % 4]
        self._kind += 1
        if kind != "text":
            return kind
        if not self.text_writes.is_set() or time.monotonic() - self._last_text < self.text_every:
            return None
        self._last_text = time.monotonic()
        self._text_kind += 1
        return ("insert", "edit")[self._text_kind % 2]

    def _trigger_fired(self, cursor):
        row = cursor.fetchone()
        if row is None or row[0] is not True:
            self.trigger_missed += 1

    def finish(self):
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the application client did not stop"

    def summary(self):
        return (f"{self.polls:,} transactions read the session state on {len(self.server_pids)} server "
                f"connection(s); writes: {dict(self.writes)}; seen: {dict(self.seen) or 'nothing'}"
                + "".join(f"\n  {name} first seen at transaction {poll:,} (server pid {pid}) during `{step}`: "
                          f"{value!r}; values seen: {sorted(self.values_seen[name])}"
                          for name, (poll, pid, value, step) in self.first_seen.items()))


def finished(process, timeout=STEP_SECONDS):
    try:
        out, err = process.communicate(timeout=timeout)
    except Exception:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_follower(process):
    process.send_signal(signal.SIGTERM)
    return finished(process, timeout=30)


@pytest.fixture
def application_schema_at_legacy(segments_at):
    """The legacy table with 150 demo segments, and what the application has beside it before the
    switch: an updated_at column stamped by a BEFORE UPDATE trigger of its own (as the original
    project's), and a table of its own with a foreign key to segments."""
    segments_at("legacy")
    call_command("load_demo_segments", count=150, seed=11, verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("""
            ALTER TABLE segments ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
            CREATE FUNCTION app_stamp_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.updated_at = now(); RETURN NEW; END $$;
            CREATE TRIGGER app_stamp_updated_at BEFORE UPDATE ON segments
                FOR EACH ROW EXECUTE FUNCTION app_stamp_updated_at();
            CREATE TABLE app_bookmark (id bigserial PRIMARY KEY, segment_id int NOT NULL REFERENCES segments (id),
                                       note text NOT NULL);
        """)
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS app_bookmark; DROP FUNCTION IF EXISTS app_stamp_updated_at() CASCADE;")


# Before these steps the application's text writes pause and the follower catches up: the index
# build refuses while more than 1% of the rows wait for a vector, and the check fails on any.
NEED_EVERY_ROW = {("embedding_switch", "index"), ("verify_embeddings",)}


def test_an_application_on_the_same_pool_never_sees_the_switchs_settings(pgbouncer, segments_at,
                                                                         application_schema_at_legacy):
    pooled_env = {"DATABASE_URL": pgbouncer.url, "DATABASE_DIRECT_URL": pgbouncer.direct_url}
    steps = [readme.manage_args(argv) for argv in readme.runbook()]
    names = [" ".join(args) for args in steps]
    for required in ("migrate", "backfill_embeddings", "embedding_switch index", "verify_embeddings",
                     "embedding_switch swap", "embedding_switch contract --confirm"):
        assert required in names, names
    steps.append(("search_segments", "fasting and red meat", "--k", "5"))

    with connection.cursor() as cursor:
        cursor.execute("SELECT DISTINCT updated_at FROM segments")
        (loaded_at,), = cursor.fetchall()
    defaults = server_defaults(pgbouncer.direct_url)
    app = Application(pgbouncer.url, defaults)
    app.start()
    follower = None
    timings = []
    try:
        for args in steps:
            if args[:2] in NEED_EVERY_ROW or args[:1] in NEED_EVERY_ROW:
                app.text_writes.clear()
                time.sleep(0.3)  # a text write in flight commits
                assert wait_until(lambda: count_pending() == 0, 60), "the follower did not catch up"
            app.step = " ".join(args)
            started = time.monotonic()
            code, out, err = finished(manage(*args, env=pooled_env))
            timings.append(f"{app.step}: {time.monotonic() - started:.1f} s")
            inconclusive = args[0] == "embedding_eval" and code == 3  # its verdict: too few segments to judge
            assert code == 0 or inconclusive, f"{app.step} through the pooler exited {code}:\n{out}\n{err}\n" \
                                              f"pgbouncer:\n{pgbouncer.log_tail()}"
            app.text_writes.set()
            if follower is None:  # a follower embeds what arrives from phase 1 on, as in production
                follower = manage("backfill_embeddings", "--follow", env=pooled_env)
        app.step = "after the contract"
        time.sleep(1.0)
    finally:
        app.text_writes.set()
        follower_code, follower_out, follower_err = stop_follower(follower) if follower else (None, "", "")
        app.finish()
        print(f"\n{app.summary()}\n{pgbouncer.report()}\nsteps: {'; '.join(timings)}\n"
              f"follower:\n{follower_out[-2000:]}{follower_err[-2000:]}")

    assert embedding_schema().phase == "final"
    assert app.errors == [], app.errors[:5]
    assert app.polls >= 1000, app.summary()
    settings_seen = {name: count for name, count in app.seen.items() if name in SETTINGS}
    assert settings_seen == {}, app.summary()  # a setting of the switch reached the application
    other_state = {name: count for name, count in app.seen.items() if name != "temporary_tables"}
    assert other_state == {}, app.summary()  # LISTEN, a session advisory lock, a prepared statement, a cursor
    assert app.trigger_missed == 0, app.summary()
    assert app.bad_fk_accepted == 0, app.summary()
    assert all(app.writes[kind] > 0 for kind in Application.KINDS), app.summary()
    assert not [kind for kind in app.writes if kind.endswith("failed")], app.summary()
    with connection.cursor() as cursor:  # and the switch's own writes left the trigger quiet
        cursor.execute("SELECT count(*) FROM segments WHERE updated_at <> %s AND NOT id = ANY(%s)",
                       [loaded_at, sorted(app.updated | app.inserted)])
        assert cursor.fetchone() == (0,)
    assert follower_code == 0, f"{follower_out}\n{follower_err}"
    assert "woken by NOTIFY" in follower_out.splitlines()[0], follower_out  # it LISTENs over the direct URL

    # The vector writer stages each batch in an ON COMMIT DROP temporary table: none outlives its
    # transaction, so the application's transactions never find one on a pooled server connection.
    tables = {table for value in app.values_seen["temporary_tables"] for table in value.split(", ")}
    assert not tables, app.summary()


def test_control_a_session_setting_left_on_the_pool_is_seen_within_seconds(pgbouncer, segments_at):
    """The baseline of the test above: a client that does leave a session setting on a server
    connection (a plain SET, committed) is seen by the same application poller within seconds.
    It shows that PgBouncer here resets nothing between clients (as in production) and that the
    poller meets the server connections other clients used; so the poller seeing nothing during
    the switch means the switch left nothing, not that the poller could not have seen it."""
    segments_at("expanded")
    defaults = server_defaults(pgbouncer.direct_url)
    assert defaults["lock_timeout"] != "1234ms"
    app = Application(pgbouncer.url, defaults, write_every=10**9)
    app.start()
    try:
        assert wait_until(lambda: app.polls > 50, 10), app.errors
        assert app.seen == {}, app.summary()
        careless = pgbouncer.connect()
        with careless, careless.cursor() as cursor:
            cursor.execute("SET lock_timeout = '1234ms'")  # session-level, and committed
        careless.close()
        started = time.monotonic()
        assert wait_until(lambda: app.seen, 5), app.summary()
        seen_after = time.monotonic() - started
    finally:
        app.finish()
    print(f"\nseen after {seen_after * 1000:.0f} ms, at {app.summary()}")
    assert set(app.seen) == {"lock_timeout"} and app.first_seen["lock_timeout"][2] == "1234ms", app.summary()
    assert app.errors == []


def first_line(process, seconds=120):
    """The process's first line of output ("" when it ends or `seconds` pass without one)."""
    line = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    return line[0] if line else ""


def test_without_a_direct_url_the_index_build_refuses_and_the_follower_polls(pgbouncer, default_pgbouncer, segments_at,
                                                                            schema_dump):
    """Through the pooler with no DATABASE_DIRECT_URL: the follower cannot LISTEN, so it polls and
    says so in its first line, and embeds what arrives (here, the whole expanded table, then a
    segment inserted through the pooler); the concurrent index build, which needs a session of its
    own, refuses, naming DATABASE_DIRECT_URL, with the schema unchanged, through a PgBouncer that
    drops startup options and through one that refuses them (its default); SIGTERM stops the
    follower with exit status 0."""
    segments_at("expanded")
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) "
                       "SELECT 'v', n, n + 1, 'segment ' || n || ' on fasting, insulin and red meat' "
                       "FROM generate_series(1, 40) n")
    no_direct = {"DATABASE_URL": pgbouncer.url, "DATABASE_DIRECT_URL": ""}
    follower = manage("backfill_embeddings", "--follow", "--poll-seconds", "0.5", env=no_direct)
    first = ""
    try:
        first = first_line(follower)
        assert "polling every 0.5 s" in first and "DATABASE_DIRECT_URL" in first, first
        assert wait_until(lambda: count_pending() == 0, 60), "the follower did not backfill the table"

        before = schema_dump()
        code, out, err = finished(manage("embedding_switch", "index", env=no_direct))
        assert code != 0, out
        assert "DATABASE_DIRECT_URL" in err, (out, err)
        assert schema_dump() == before
        assert embedding_schema().phase == "expanded"

        app = pgbouncer.connect()
        with app, app.cursor() as cursor:
            cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES "
                           "('v', 0, 1, 'a segment that arrives through the pooler') RETURNING id")
            segment = cursor.fetchone()[0]
        app.close()
        column = embedding_schema().vector_column

        def embedded():
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT {column} IS NOT NULL FROM segments WHERE id = %s", [segment])
                return cursor.fetchone()[0]

        assert wait_until(embedded, 30), "the follower did not embed the segment"
    finally:
        code, out, err = stop_follower(follower)
    assert code == 0, (first, out, err)
    assert "Stopped" in out, out

    # PgBouncer's own default refuses a connection that sends startup options, before the
    # project can tell it is a pooler: the build must still refuse, and name DATABASE_DIRECT_URL.
    code, out, err = finished(manage("embedding_switch", "index", env={"DATABASE_URL": default_pgbouncer.url,
                                                                         "DATABASE_DIRECT_URL": ""}))
    assert code != 0, out
    assert schema_dump() == before
    assert "DATABASE_DIRECT_URL" in err, (out, err)


def test_a_contract_whose_direct_url_is_a_pooler_dropping_startup_options_refuses_before_any_change(pgbouncer,
                                                                                                      segments_at):
    """DATABASE_DIRECT_URL set by mistake to a pooler that drops startup options: the contract's own
    connection checks its lock_timeout in its first message (with its look at the table) and refuses,
    naming the setting, with nothing changed: the legacy column, its vectors and index, no start recorded."""
    from tests.embeddings.conftest import swapped_with_legacy_vectors

    segments_at("expanded")
    swapped_with_legacy_vectors(30)

    def state():
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(embedding_legacy), to_regclass('segments_embedding_legacy_idx') IS NOT NULL, "
                           "(SELECT count(*) FROM segments_switch_event WHERE step = 'contract-started') "
                           "FROM segments")
            return cursor.fetchone()

    assert state() == (30, True, 0)
    code, out, err = finished(manage("embedding_switch", "contract", "--confirm",
                                     env={"DATABASE_URL": pgbouncer.url, "DATABASE_DIRECT_URL": pgbouncer.url}))
    assert code != 0, out
    assert "lock_timeout = 5s as a startup option" in err and "DATABASE_DIRECT_URL" in err, err
    assert "Traceback" not in err, err
    assert state() == (30, True, 0)
    assert embedding_schema().phase == "swapped"
