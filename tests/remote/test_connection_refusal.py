"""Which failures to connect are settings to fix (one line, never retried), and which may pass.

The messages are libpq's own, as psycopg2 raises them (test_tls.py meets the TLS ones for real).
"""
import psycopg2
import pytest
from django.db import connection
from django.db.utils import OperationalError as DjangoOperationalError

from askdrchaffee import postgres

AT = 'connection to server at "db.example.net" (203.0.113.5), port 5432 failed: '


def refusal(message):
    return postgres.connection_refusal(psycopg2.OperationalError(message))


@pytest.mark.parametrize("message, line", [
    (AT + 'FATAL:  password authentication failed for user "app"\n',
     "Cannot connect to the database: the server refused the password of user app. Set the user's password in "
     "DATABASE_URL (with its special characters percent-encoded). Nothing was written."),
    ('could not translate host name "db.exmaple.net" to address: Name or service not known\n',
     "Cannot connect to the database: no host is named db.exmaple.net. Correct the host in DATABASE_URL. "
     "Nothing was written."),
    (AT + 'FATAL:  no pg_hba.conf entry for host "198.51.100.7", user "app", database "app", SSL encryption\n' + AT
     + 'FATAL:  no pg_hba.conf entry for host "198.51.100.7", user "app", database "app", no encryption\n',
     "Cannot connect to the database: the server admits no connection from 198.51.100.7 as user app to database "
     "app (no pg_hba.conf entry). Check the user and database name in DATABASE_URL, and that the server accepts "
     "connections from this address. Nothing was written."),
])
def test_a_failure_only_a_setting_can_mend_is_one_line_naming_it(message, line):
    assert refusal(message) == line
    assert postgres.connection_refusal(wrapped(psycopg2.OperationalError(message))) == line


def test_a_missing_ca_file_is_named(monkeypatch):
    monkeypatch.setenv("PGSSLMODE", "verify-full")  # libpq's variable, where the URL does not set sslmode
    message = (AT + 'root certificate file "/etc/ssl/provider.crt" does not exist\nEither provide the file, use the '
               "system's trusted roots with sslrootcert=system, or change sslmode to disable server certificate "
               "verification.\n")
    assert refusal(message) == (
        "Cannot connect to the database: sslmode=verify-full checks the server's certificate, and "
        "sslrootcert=/etc/ssl/provider.crt does not exist. Set sslrootcert in DATABASE_URL to the file of the CA that "
        "signed it (sslrootcert=system: the system's CAs). Nothing was written.")


@pytest.mark.parametrize("message", [
    AT + "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?\n",
    'could not translate host name "db.example.net" to address: Temporary failure in name resolution\n',
    AT + "timeout expired\n",
    AT + "FATAL:  the database system is starting up\n",
    "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally\n",
])
def test_a_failure_that_may_pass_is_not_a_refusal(message):
    assert refusal(message) is None


@pytest.mark.django_db
def test_the_error_of_a_statement_is_not_a_refusal_whatever_it_says():
    with pytest.raises(DjangoOperationalError) as raised, connection.cursor() as cursor:
        cursor.execute("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '57014', "
                       "MESSAGE = 'password authentication failed for user \"app\"'; END $$")
    assert "password authentication failed" in str(raised.value)
    assert postgres.connection_refusal(raised.value) is None


def test_the_url_named_is_the_one_whose_host_failed(settings):
    settings.DATABASE_DIRECT = {"HOST": "db.example.net", "PORT": 5432, "OPTIONS": {"sslrootcert": "/etc/ca.crt"}}
    assert refusal(AT + "SSL error: certificate verify failed\n") == (
        "Cannot connect to the database: the server's certificate is not signed by the CA in sslrootcert=/etc/ca.crt "
        "(certificate verify failed). Set sslrootcert in DATABASE_DIRECT_URL to the CA that signed it. "
        "Nothing was written.")


def wrapped(error):
    """Django's OperationalError around `error`, as a Django connection raises it."""
    try:
        raise DjangoOperationalError(*error.args) from error
    except DjangoOperationalError as django_error:
        return django_error


class Failing:
    """A callable that raises `error` every time; `calls` counts them."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self):
        self.calls += 1
        raise self.error


def test_a_refusal_is_not_retried_and_a_lost_connection_is():
    refused = Failing(psycopg2.OperationalError(AT + "SSL error: certificate verify failed\n"))
    lost = Failing(psycopg2.OperationalError(AT + "Connection refused\n"))
    for failing in (refused, lost):
        with pytest.raises(psycopg2.OperationalError):
            postgres.retrying(attempts=3, wait=lambda attempt: 0, sleep=lambda seconds: None)(failing)
    assert (refused.calls, lost.calls) == (1, 3)
