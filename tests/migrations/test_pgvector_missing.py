"""A database whose server has no pgvector gets an error that names the fix."""
import uuid

import pytest
from django.db import connection

from tests.conftest import database_url, manage


@pytest.fixture
def empty_database(transactional_db):
    name = f"test_novector_{uuid.uuid4().hex[:8]}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield name
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_without_pgvector_fails_with_the_fix(empty_database):
    # PostgreSQL 18 looks for extensions only where extension_control_path says: an empty
    # directory makes this server behave exactly like one without pgvector installed.
    url = database_url().replace(connection.get_connection_params()["dbname"], empty_database)
    url += "&options=-c%20extension_control_path%3D/nonexistent"
    process = manage("migrate", "segments", env={"DATABASE_URL": url})
    out, err = process.communicate(timeout=120)

    assert process.returncode != 0
    assert "does not have the pgvector extension installed" in err
    assert "unset DATABASE_URL" in err
    assert "Traceback" not in err
