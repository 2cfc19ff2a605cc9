"""The test database behind TLS fronts (tls_front.py), as an operator far from it reaches it.

`fronts` yields a Fronts: `url(front, **options)` is a DATABASE_URL of the test database through
one of them (host 127.0.0.1, the front's port, libpq options such as sslmode and sslrootcert in
its query), and `env(...)` the environment of a `manage.py` run that uses it, with
DATABASE_DIRECT_URL the same URL (a front, like a port forward, is taken for a pooler: another
port than the server's own).
"""
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from django.db import connection

from tests.remote.tls_front import Certificates, TlsFront, certificates


@dataclass(frozen=True)
class Fronts:
    certificates: Certificates
    tls: TlsFront  # requires TLS; its certificate is for localhost and 127.0.0.1, signed by certificates.ca
    other_host: TlsFront  # requires TLS; its certificate is for db.example.net, signed by certificates.ca
    plain: TlsFront  # a server without SSL support
    database: str

    def url(self, front, **options):
        return f"postgresql://postgres@127.0.0.1:{front.port}/{self.database}?{urlencode(options)}"

    def env(self, front, **options):
        url = self.url(front, **options)
        return {"DATABASE_URL": url, "DATABASE_DIRECT_URL": url}


def server_socket():
    """The embedded server's Unix socket (the test database's host is its directory)."""
    directory = Path(connection.get_connection_params()["host"])
    (socket,) = [path for path in directory.glob(".s.PGSQL.*") if path.suffix != ".lock"]
    return socket


@pytest.fixture(scope="module")
def made_certificates(tmp_path_factory):
    return certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def fronts(transactional_db, made_certificates):
    socket = server_socket()
    with TlsFront(socket, *made_certificates.server) as tls, \
            TlsFront(socket, *made_certificates.other_host) as other_host, TlsFront(socket, tls=False) as plain:
        yield Fronts(made_certificates, tls, other_host, plain, connection.get_connection_params()["dbname"])
