"""A real PgBouncer in transaction mode in front of the embedded PostgreSQL.

`pgbouncer` (a fixture) starts one for a test and stops it after (terminate, then wait): a fresh
pooler each test, so that a session setting one test leaves on a server connection cannot reach
the next. It yields a Pooler with the pooled URL of the test database (127.0.0.1, a free port) and
the direct one (the server's own socket, as the other tests reach it). It drops the startup
parameters `extra_float_digits` and `options`, as deployments configure it for drivers that send
them; `default_pgbouncer` keeps PgBouncer's own default, which refuses a connection sending them.

The embedded server listens only on a Unix socket inside its data directory, which only the
directory's owner may enter; PgBouncer therefore runs as that user (the tests run as root, or as
that user). The fixture skips, saying why, when PgBouncer is not installed (Debian's `pgbouncer`
package; `.ci/run` installs it) or the tests cannot run it as that user.

The pool is small (POOL_SIZE server connections) and handed out round robin, so that a client
that polls meets every server connection the pooler holds, within a few transactions: a setting
left behind on any of them is seen.
"""
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from django.db import connection

from tests.conftest import database_url

POOL_SIZE = 4
START_SECONDS = 10.0
STOP_SECONDS = 10.0


@dataclass(frozen=True)
class Pooler:
    url: str  # the test database through PgBouncer (transaction mode)
    direct_url: str  # the same database over the server's own socket
    port: int
    log: Path

    def connect(self, **kwargs):
        """A new psycopg2 connection through the pooler."""
        return psycopg2.connect(self.url, **kwargs)

    def stats(self):
        """PgBouncer's SHOW STATS row of the test database ({column: value})."""
        admin = psycopg2.connect(host="127.0.0.1", port=self.port, dbname="pgbouncer", user="postgres")
        admin.autocommit = True  # the admin console takes no transactions
        try:
            with admin.cursor() as cursor:
                cursor.execute("SHOW STATS")
                names = [column[0] for column in cursor.description]
                rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            admin.close()
        database = self.url.rsplit("/", 1)[1]
        return next((row for row in rows if row["database"] == database), {})

    def report(self):
        """One line: the transactions PgBouncer passed on, and their wait for a server connection."""
        try:
            stats = self.stats()
        except psycopg2.Error as exc:
            return f"pgbouncer: no stats ({' '.join(str(exc).split())})"
        transactions, waited = int(stats.get("total_xact_count") or 0), int(stats.get("total_wait_time") or 0)
        return f"pgbouncer: {transactions:,} transactions, {waited / 1e6:.2f} s waited for a server connection in all"

    def log_tail(self, lines=30):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def pgbouncer_binary():
    return shutil.which("pgbouncer", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin",
                                                           "/usr/local/sbin"]))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def config(*, port, socket_dir, server_port, workdir, ignore_startup_parameters):
    return f"""\
[databases]
* = host={socket_dir} port={server_port} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {POOL_SIZE}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 200
; round robin, not the default LIFO: a polling client then meets every server connection
server_round_robin = 1
; what DISCARD ALL would hide: in transaction mode PgBouncer resets nothing between clients
server_reset_query =
server_reset_query_always = 0
ignore_startup_parameters = {ignore_startup_parameters}
; a client that waits this long for a server connection fails, instead of hanging the test
query_wait_timeout = 60
; SHOW STATS and SHOW POOLS on the admin console (database "pgbouncer"), for the tests' reports
admin_users = postgres
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
"""


def _owner_of(path):
    stat = Path(path).stat()
    return pwd.getpwuid(stat.st_uid), stat.st_gid


def _wait_ready(url, process, deadline):
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            psycopg2.connect(url, connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            time.sleep(0.1)
    return False


def _stop(process):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_SECONDS)


@contextmanager
def running_pgbouncer(ignore_startup_parameters="extra_float_digits,options"):
    """A PgBouncer in front of the test database, stopped (terminate, then wait) on leaving; a
    Pooler. The tests skip where it cannot run (the module docstring)."""
    binary = pgbouncer_binary()
    if binary is None:
        pytest.skip("PgBouncer is not installed (Debian: apt-get install pgbouncer; .ci/run installs it)")
    params = connection.get_connection_params()
    socket_dir = params.get("host")
    if not socket_dir or not socket_dir.startswith("/"):
        pytest.skip("the pooler tests front the embedded PostgreSQL (its Unix socket); DATABASE_URL points elsewhere")
    owner, group = _owner_of(socket_dir)
    as_owner = os.geteuid() == owner.pw_uid
    if not as_owner and os.geteuid() != 0:
        pytest.skip(f"PgBouncer must run as {owner.pw_name}, the owner of the server's socket directory "
                    f"{socket_dir}: run the tests as root or as {owner.pw_name}")
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('port')::int")
        server_port = cursor.fetchone()[0]

    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    process = None
    try:
        if not as_owner:
            os.chown(workdir, owner.pw_uid, group)
        for _ in range(5):  # another process may take the free port first
            port = free_port()
            ini = workdir / "pgbouncer.ini"
            ini.write_text(config(port=port, socket_dir=socket_dir, server_port=server_port, workdir=workdir,
                                  ignore_startup_parameters=ignore_startup_parameters))
            url = f"postgresql://postgres@127.0.0.1:{port}/{params['dbname']}"
            with open(workdir / "pgbouncer.out", "w") as out:
                process = subprocess.Popen(
                    [binary, str(ini)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=workdir, start_new_session=True,
                    **({} if as_owner else {"user": owner.pw_uid, "group": group, "extra_groups": []}),
                )
            if _wait_ready(url, process, time.monotonic() + START_SECONDS):
                break
            _stop(process)
        else:
            output = (workdir / "pgbouncer.out").read_text(errors="replace")
            pytest.fail(f"PgBouncer did not start:\n{output}")
        yield Pooler(url=url, direct_url=database_url(), port=port, log=workdir / "pgbouncer.log")
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pgbouncer(transactional_db):
    """PgBouncer in transaction mode, set up as for an application whose driver sends startup
    parameters (`ignore_startup_parameters = extra_float_digits,options`): it drops them."""
    with running_pgbouncer() as pooler:
        yield pooler


@pytest.fixture
def default_pgbouncer(transactional_db):
    """PgBouncer in transaction mode with its own default for startup parameters: a connection that
    sends `options` is refused (FATAL: unsupported startup parameter: options)."""
    with running_pgbouncer(ignore_startup_parameters="") as pooler:
        yield pooler
