"""The runbook over TLS, and the settings that cannot work refused in one line.

The embedded PostgreSQL is built without SSL, so these tests reach it through TLS fronts on
127.0.0.1 (tls_front.py, conftest.py), each command a `manage.py` process as an operator runs it:

- with `sslmode=verify-full&sslrootcert=<the CA>` (and `sslmode=require`): the runbook's commands,
  the follower embedding an arrival, the search and the admin's changelist work, and every
  connection the project opens carries TLS and the keepalive options;
- a certificate from another CA, a certificate for another host, `sslmode=disable` where the
  server requires TLS and `sslmode=require` where it has none: each command exits non-zero with
  one line naming the setting to fix, no traceback, and nothing written.
"""
import select
import signal

import pytest
from django.db import connection

from tests.conftest import manage
from tests.embeddings.conftest import add_segments, scalar, sentences
from tests.embeddings.test_follow import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SECONDS = 300  # the longest a command may take here before the test fails

# The admin's changelist through Django's test client, in a process whose DATABASE_URL is the front.
ADMIN_CHANGELIST = """
from django.contrib.auth.models import User
from django.test import Client
user, _ = User.objects.get_or_create(username="operator", defaults={"is_staff": True, "is_superuser": True})
client = Client(HTTP_HOST="localhost")
client.force_login(user)
response = client.get("/admin/segments/segment/")
print(response.status_code, response.content.decode())
"""
# The same page for a visitor with a session cookie (its session is read from the database).
ADMIN_PAGE_WITH_A_SESSION = """
from django.test import Client
client = Client(HTTP_HOST="localhost", raise_request_exception=False)
client.cookies["sessionid"] = "x" * 32
print(client.get("/admin/segments/segment/").status_code)
"""
# TLS, and the socket's keepalive options, of each kind of connection the project opens.
CONNECTIONS = """
import socket
from django.db import connection
from askdrchaffee import postgres
from segments.switch.backfill.session import connector
connection.ensure_connection()
opened = {"django": connection.connection, "engine": connector()("check"), "private": postgres.private_connection()}
for name, raw in opened.items():
    tcp = socket.socket(fileno=socket.dup(raw.fileno()))
    options = [tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] + [
        tcp.getsockopt(socket.IPPROTO_TCP, option) for option in
        (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, socket.TCP_USER_TIMEOUT)]
    print(name, raw.info.ssl_in_use, *options, raw.get_dsn_parameters()["connect_timeout"])
"""


def run(*args, env):
    """`manage.py *args` with `env`; (exit status, stdout, stderr)."""
    process = manage(*args, env=env)
    out, err = process.communicate(timeout=SECONDS)
    return process.returncode, out, err


def succeeds(*args, env):
    status, out, err = run(*args, env=env)
    assert status == 0, f"{' '.join(args)} exited {status}:\n{out}\n{err}"
    return out


def written():
    """What a refused command must leave as it was: applied migrations, segments and their vectors."""
    return (scalar("SELECT count(*) FROM django_migrations"), scalar("SELECT count(*) FROM segments"),
            scalar("SELECT count(*) FROM segments WHERE embedding IS NOT NULL"))


def test_the_runbook_the_follower_the_search_and_the_admin_work_over_verify_full(fronts):
    env = fronts.env(fronts.tls, sslmode="verify-full", sslrootcert=fronts.certificates.ca)
    texts = sentences(12, seed=4)
    add_segments(texts)

    succeeds("migrate", env=env)
    assert "Embedded 12 segment(s)" in succeeds("backfill_embeddings", env=env)
    assert scalar("SELECT count(*) FROM segments WHERE embedding IS NULL") == 0

    follower = manage("backfill_embeddings", "--follow", env=env)  # it loads its model meanwhile
    try:
        succeeds("embedding_status", env=env)
        succeeds("verify_embeddings", "--recall-seconds", "2", env=env)
        assert texts[0] in succeeds("search_segments", texts[0], "--k", "3", env=env)
        status_code, page = succeeds("shell", "-v", "0", "-c", ADMIN_CHANGELIST, env=env).split(" ", 1)
        assert status_code == "200" and texts[0] in page
        ready, _, _ = select.select([follower.stdout], [], [], SECONDS)
        first = follower.stdout.readline() if ready else ""
        assert "Following:" in first and "woken by NOTIFY segments_embedding" in first, first
        (arrival,) = add_segments(["a segment that arrives while the follower listens over TLS"])
        assert wait_until(lambda: scalar("SELECT embedding IS NOT NULL FROM segments WHERE id = %s", [arrival]), 60)
    finally:
        follower.send_signal(signal.SIGTERM)
        out, err = follower.communicate(timeout=SECONDS)
    assert follower.returncode == 0, err
    assert "Traceback" not in err


def test_every_connection_is_encrypted_and_notices_a_silent_link(fronts):
    env = fronts.env(fronts.tls, sslmode="verify-full", sslrootcert=fronts.certificates.ca)
    lines = succeeds("shell", "-v", "0", "-c", CONNECTIONS, env=env).split("\n")
    # TLS, SO_KEEPALIVE, keepalives_idle 10 s, keepalives_interval 5 s, keepalives_count 3,
    # tcp_user_timeout 25 s, connect_timeout 10 s
    assert [line.split() for line in lines if line] == [
        [name, "True", "1", "10", "5", "3", "25000", "10"] for name in ("django", "engine", "private")]


def test_sslmode_require_encrypts_without_checking_the_certificate(fronts):
    env = fronts.env(fronts.other_host, sslmode="require")
    assert succeeds("embedding_status", "--json", env=env).startswith("{")


WRONG_CA = ("Cannot connect to the database: the server's certificate is not signed by the CA in "
            "sslrootcert={other_ca} (certificate verify failed). Set sslrootcert in DATABASE_URL to the CA that "
            "signed it. Nothing was written.")
OTHER_HOST = ("Cannot connect to the database: the server's certificate is for db.example.net, not for 127.0.0.1 "
              "(sslmode=verify-full checks the name). Use in DATABASE_URL the host name its certificate names, or "
              "set sslmode=verify-ca there (it checks the CA only). Nothing was written.")
TLS_NOT_ASKED = ("Cannot connect to the database: the server requires TLS and sslmode=disable does not ask for it "
                 "(no pg_hba.conf entry without TLS). Set sslmode=require in DATABASE_URL (or verify-full with "
                 "sslrootcert). Nothing was written.")
NO_TLS_THERE = ("Cannot connect to the database: the server does not speak TLS and sslmode=require requires it. "
                "Check the host and port in DATABASE_URL (a managed database speaks TLS), or set sslmode=prefer "
                "there. Nothing was written.")


def bad_settings(fronts):
    """{case: (environment, the line the operator must see)}."""
    certificates = fronts.certificates
    return {
        "a CA that did not sign the certificate": (
            fronts.env(fronts.tls, sslmode="verify-full", sslrootcert=certificates.other_ca),
            WRONG_CA.format(other_ca=certificates.other_ca)),
        "a certificate for another host": (
            fronts.env(fronts.other_host, sslmode="verify-full", sslrootcert=certificates.ca), OTHER_HOST),
        "no TLS asked where it is required": (fronts.env(fronts.tls, sslmode="disable"), TLS_NOT_ASKED),
        "TLS required where the server has none": (fronts.env(fronts.plain, sslmode="require"), NO_TLS_THERE),
    }


def assert_refused_in_one_line(status, err, line):
    assert status != 0
    assert "Traceback" not in err, err
    assert [text for text in err.splitlines() if "Cannot connect" in text] == [f"CommandError: {line}"], err


@pytest.mark.parametrize("case", ["a CA that did not sign the certificate", "a certificate for another host",
                                  "no TLS asked where it is required", "TLS required where the server has none"])
def test_a_setting_that_cannot_work_is_refused_in_one_line_naming_it(fronts, case):
    env, line = bad_settings(fronts)[case]
    add_segments(sentences(3))
    before = written()
    processes = [manage(*args, env=env) for args in (("migrate",), ("backfill_embeddings",))]
    for process in processes:
        out, err = process.communicate(timeout=SECONDS)
        assert_refused_in_one_line(process.returncode, err, line)
    assert written() == before


def test_the_follower_stops_at_once_on_a_wrong_ca_instead_of_waiting(fronts):
    env, line = bad_settings(fronts)["a CA that did not sign the certificate"]
    add_segments(sentences(3))
    before = written()
    status, out, err = run("backfill_embeddings", "--follow", env=env)
    assert_refused_in_one_line(status, err, line)
    assert "Waiting" not in out
    assert written() == before


def test_the_admin_logs_a_refusal_in_one_line(fronts):
    env, line = bad_settings(fronts)["a CA that did not sign the certificate"]
    status, out, err = run("shell", "-v", "0", "-c", ADMIN_PAGE_WITH_A_SESSION, env=env)
    assert (status, out.strip()) == (0, "500")
    assert "Traceback" not in err
    assert [text for text in err.splitlines() if "Cannot connect" in text] == [line], err


def test_a_failed_page_that_is_not_a_refusal_keeps_its_traceback_in_the_log(fronts):
    env = fronts.env(fronts.tls, sslmode="verify-full", sslrootcert=fronts.certificates.ca)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE django_session RENAME TO django_session_away")
    try:
        status, out, err = run("shell", "-v", "0", "-c", ADMIN_PAGE_WITH_A_SESSION, env=env)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE django_session_away RENAME TO django_session")
    assert (status, out.strip()) == (0, "500")
    assert "Traceback" in err and 'relation "django_session" does not exist' in err
