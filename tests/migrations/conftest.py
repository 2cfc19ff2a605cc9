import re
import subprocess
from pathlib import Path

import pytest
from django.db import connection

from tests.conftest import database_url


def _pg_dump():
    import pgserver

    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    return str(bundled) if bundled.exists() else "pg_dump"


def dump_schema():
    """`pg_dump --schema-only` of the public schema, without comments and blank lines."""
    params = connection.get_connection_params()
    out = subprocess.run(
        [_pg_dump(), "--schema-only", "--no-owner", "--schema=public", "--exclude-table=django_migrations*",
         "-h", params["host"], "-U", params.get("user") or "postgres", params["dbname"]],
        check=True, capture_output=True, text=True,
    ).stdout
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("--")]
    # pg_dump 17+ writes a random token on its \restrict lines.
    return "\n".join(re.sub(r"^\\(un)?restrict .*", r"\\restrict", line) for line in lines)


@pytest.fixture
def schema_dump():
    return dump_schema


@pytest.fixture
def sql():
    """Run SQL on the test database; returns fetched rows for queries that return any."""

    def run(statement, params=None):
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    return run


__all__ = ["database_url"]
