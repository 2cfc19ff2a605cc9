"""A real streaming replica, and backfills in processes of their own, for the throttle's tests.

`standby` (a fixture, one per test module) starts a PostgreSQL server of its own in a temporary
directory with the embedded server's binaries, copies the test database into it (pg_dump and
pg_restore, with `segments` rebuilt at the expanded phase for the copy, where a backfill fills the new
column before its HNSW index exists; migrations recorded), then takes a base backup of it
(`pg_basebackup -R`, which writes the standby's settings) and starts that as its streaming replica,
with `cluster_name` REPLICA_NAME, so that `pg_stat_replication` lists it under that name.
`pause_replay()` runs `pg_wal_replay_pause()` on the replica (it keeps receiving the WAL and stops
applying it: its lag grows with every write), `resume_replay()` lets it apply again.

Why a server of its own rather than a replica of the server the other tests use: a replica's lag
holds back every throttled writer of the server it follows, so a replica of the shared test server
with its replay paused would hold back the backfills of every other test run on that server; and a
base backup copies every database of the server, however many other runs made there.

No replication slot is made (the base backup's own is temporary: it goes with the backup's
session). Both servers are stopped, and their directory removed, on every path out of the module;
a watchdog process does the same should the test process die without cleaning up. They run as the
owner of the embedded server's data directory (`pgserver` when the tests run as root), as the
embedded server does. The fixture skips, saying why, where the tests reach another server
(DATABASE_URL) or cannot act as that user.
"""
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from django.db import connection

from tests.conftest import ROOT, database_url, rebuild_segments
from tests.embeddings.conftest import FAKE_BACKFILL

REPLICA_NAME = "test_replica"
PRIMARY_PORT, REPLICA_PORT = 5498, 5499  # on a socket directory of their own: no other server listens there
START_SECONDS = 60

WATCHDOG = textwrap.dedent("""
    import os, shutil, subprocess, sys, time
    parent, pg_ctl, workdir, uid, gid = sys.argv[1:6]
    def alive(pid):
        try:
            os.kill(int(pid), 0)
            return True
        except OSError:
            return False
    while alive(parent) and os.path.isdir(workdir):
        time.sleep(0.5)
    for name in ("replica", "primary"):
        data = os.path.join(workdir, name)
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], user=int(uid), group=int(gid),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(workdir, ignore_errors=True)
""")


def pg_binary(name):
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)


@dataclass
class Standby:
    """The test database's copy on a server of its own (`url`, `connect()`), and that server's streaming
    replica (module docstring)."""

    url: str
    socket_dir: Path
    dbname: str
    name: str = REPLICA_NAME

    def connect(self, dbname=None):
        """A new psycopg2 connection (autocommit) to the copy of the test database, or to `dbname`."""
        primary = psycopg2.connect(host=str(self.socket_dir), port=PRIMARY_PORT, user="postgres",
                                   dbname=dbname or self.dbname)
        primary.autocommit = True
        return primary

    def query(self, statement, params=None):
        """Run `statement` on the copy of the test database; its rows (None for a statement without)."""
        primary = self.connect()
        try:
            with primary.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall() if cursor.description else None
        finally:
            primary.close()

    def on_replica(self, statement):
        replica = psycopg2.connect(host=str(self.socket_dir), port=REPLICA_PORT, user="postgres", dbname="postgres")
        replica.autocommit = True
        try:
            with replica.cursor() as cursor:
                cursor.execute(statement)
                return cursor.fetchone()[0] if cursor.description else None
        finally:
            replica.close()

    def pause_replay(self):
        """Stop applying WAL (it still receives it); returns once the replica says it is paused."""
        self.on_replica("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while self.on_replica("SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "the replica did not pause its replay"
            time.sleep(0.05)

    def resume_replay(self):
        self.on_replica("SELECT pg_wal_replay_resume()")

    def wait_caught_up(self, seconds=START_SECONDS):
        """Wait until the replica streams and has replayed everything written so far."""
        [(position,)] = self.query("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + seconds
        while not self.query("SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming' "
                             "AND replay_lsn >= %s::pg_lsn", [self.name, position]):
            assert time.monotonic() < deadline, f"the replica did not catch up within {seconds} s"
            time.sleep(0.1)


def _owner_of(path):
    stat = Path(path).stat()
    return pwd.getpwuid(stat.st_uid), stat.st_gid


def _stop(data_dir, as_owner):
    """Stop a server of this fixture at once: its files are thrown away after."""
    if (data_dir / "postmaster.pid").exists():
        subprocess.run([pg_binary("pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "-t", "20", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_owner)


def _run(command, what, workdir, as_owner, **options):
    done = subprocess.run(command, capture_output=True, text=True, timeout=START_SECONDS, **as_owner, **options)
    if done.returncode != 0:
        logs = "".join(path.read_text(errors="replace")[-2000:] for path in workdir.glob("*.log"))
        pytest.fail(f"{what} failed:\n{done.stdout}{done.stderr}\n{logs}")


def _start(data_dir, port, workdir, as_owner, *settings):
    options = " ".join([f"-p {port} -k {workdir / 'sockets'} -h ''", *settings])
    _run([pg_binary("pg_ctl"), "-D", str(data_dir), "-w", "-t", str(START_SECONDS),
          "-l", str(workdir / f"{data_dir.name}.log"), "-o", options, "start"], f"starting the {data_dir.name}",
         workdir, as_owner)


@contextmanager
def standby_servers():
    """Start the copy of the test database and its streaming replica; stop both, remove their files."""
    params = connection.get_connection_params()
    socket_dir = params.get("host")
    if not socket_dir or not socket_dir.startswith("/"):
        pytest.skip("the replica tests copy the embedded PostgreSQL's test database (over its Unix socket); "
                    "DATABASE_URL points elsewhere")
    owner, group = _owner_of(socket_dir)
    if os.geteuid() not in (0, owner.pw_uid):
        pytest.skip(f"the servers must run as {owner.pw_name}, the embedded server's owner: run the tests as root "
                    f"or as {owner.pw_name}")
    as_owner = {} if os.geteuid() == owner.pw_uid else {"user": owner.pw_uid, "group": group, "extra_groups": []}
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('port')")
        server_port = cursor.fetchone()[0]
    workdir = Path(tempfile.mkdtemp(prefix="throttle-standby-"))
    primary, replica, sockets = workdir / "primary", workdir / "replica", workdir / "sockets"
    sockets.mkdir()
    watchdog = None
    try:
        if as_owner:
            for path in (workdir, sockets):
                os.chown(path, owner.pw_uid, group)
        watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), pg_binary("pg_ctl"),
                                     str(workdir), str(owner.pw_uid), str(group)], start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _run([pg_binary("initdb"), "-D", str(primary), "-U", "postgres", "--auth=trust", "--encoding=utf8",
              "--no-sync"], "initdb", workdir, as_owner)
        _start(primary, PRIMARY_PORT, workdir, as_owner, "-c fsync=off")
        dump = workdir / "test.dump"
        rebuild_segments("expanded")
        try:
            _run([pg_binary("pg_dump"), "-h", socket_dir, "-p", server_port, "-U", "postgres", "-Fc", "-f", str(dump),
                  params["dbname"]], "copying the test database (pg_dump)", workdir, as_owner)
        finally:
            rebuild_segments("final")
        _run([pg_binary("pg_restore"), "-h", str(sockets), "-p", str(PRIMARY_PORT), "-U", "postgres", "--create",
              "-d", "postgres", str(dump)], "copying the test database (pg_restore)", workdir, as_owner)
        _run([pg_binary("pg_basebackup"), "-h", str(sockets), "-p", str(PRIMARY_PORT), "-U", "postgres",
              "-D", str(replica), "-R", "-X", "stream", "-c", "fast"], "pg_basebackup", workdir, as_owner)
        _start(replica, REPLICA_PORT, workdir, as_owner, f"-c cluster_name={REPLICA_NAME}")
        url = f"postgresql://postgres@/{params['dbname']}?host={sockets}&port={PRIMARY_PORT}"
        servers = Standby(url, sockets, params["dbname"])
        servers.wait_caught_up()
        yield servers
    finally:
        try:
            _stop(replica, as_owner)
            _stop(primary, as_owner)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            if watchdog is not None:
                watchdog.kill()
                watchdog.wait()


@pytest.fixture(scope="module")
def standby(django_db_setup, django_db_blocker):
    """The test database's copy with its streaming replica (module docstring), one per test module."""
    with django_db_blocker.unblock(), standby_servers() as servers:
        yield servers


@pytest.fixture
def replica(standby):
    """`standby` for one test: an empty segments table, the replica caught up with its replay running;
    its replay resumed after the test, whatever happened."""
    standby.resume_replay()
    standby.query("TRUNCATE segments, segments_backfill_worker, embeddings_backfill_claim, segments_pending_since, "
                  "embeddings_quarantine")
    standby.wait_caught_up()
    try:
        yield standby
    finally:
        try:
            standby.resume_replay()
        except psycopg2.Error:
            pass  # the module's end stops it anyway


def slow_backfill(*args, rate, env=None, url=None):
    """Start `backfill_embeddings *args` in a process of its own on the test database (or on `url`), its
    encoder the HashingEncoder at `rate` texts a second (a device of that speed); the Popen."""
    full_env = {**os.environ, "DATABASE_URL": url or database_url(), "SLOW_ENCODER_RATE": str(rate), **(env or {})}
    return subprocess.Popen([sys.executable, str(FAKE_BACKFILL), *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def manage_on(url, *args):
    """`manage.py *args` on the database at `url`, to its end; (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env={**os.environ, "DATABASE_URL": url},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


@contextmanager
def stopped_on_leaving(process):
    """Yields `process`; SIGTERM (then SIGKILL) on leaving, whatever happened."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
