"""The operator's whole sequence on the table the original project really built: its data,
all but the vectors, comes out byte for byte as it went in, and the project serves it.

The sequence is the README's, each command its own `manage.py` process against the test
database, with a plain `manage.py migrate` (what any deploy runs) between every two steps: once
the table is adopted it must exit 0 and change nothing; before, it must refuse, changing nothing,
and name `migrate --fake-initial`.
"""
import json

import numpy as np
import pytest

from django.db import connection

from segments.switch.backfill import run_backfill
from segments.switch.preflight import inspect
from tests import readme
from tests.conftest import manage, migrate_segments
from tests.migrations.original_schema import (  # noqa: F401 (fixture)
    checksums, data_columns, execute, load_rows, original_table,
)

ROWS = 60
ROLE = "test_preflight_backfill"  # roles are per server: a name no other test database uses
STEPS = [readme.manage_args(argv) for argv in readme.adoption()]  # the README's, as written


def adopt_and_expand():
    """What `migrate --fake-initial` does, in-process: 0001 recorded, phase 1 applied."""
    execute("INSERT INTO django_migrations (app, name, applied) VALUES ('segments', '0001_initial', now())")
    migrate_segments("0009_embedding_on_arrival")


def run(*args):
    process = manage(*args)
    out, err = process.communicate(timeout=900)
    inconclusive = args[0] == "embedding_eval" and process.returncode == 3  # too few segments to judge
    assert process.returncode == 0 or inconclusive, \
        f"manage.py {' '.join(args)} exited {process.returncode}:\n{out}\n{err}"
    return out


@pytest.mark.end_to_end
@pytest.mark.slow
def test_the_operators_sequence_adopts_and_switches_the_original_table_leaving_its_data_untouched(
        original_table, schema_dump, client, admin_user, use_minilm):
    original_table()
    load_rows(ROWS)
    columns = data_columns()
    before = checksums(columns)
    assert len(before) == ROWS

    for number, step in enumerate(STEPS):
        run(*step)
        assert checksums(columns) == before, f"data changed by manage.py {' '.join(step)}"
        schema = schema_dump()
        if number == 0:  # not adopted yet: a plain migrate refuses, naming --fake-initial
            refused = manage("migrate")
            out, err = refused.communicate(timeout=900)
            assert refused.returncode != 0 and "Traceback" not in err, out + err
            assert "manage.py migrate --fake-initial" in err
        else:
            run("migrate")
        assert schema_dump() == schema, f"a plain migrate after manage.py {' '.join(step)} changed the schema"
        assert checksums(columns) == before

    assert execute("SELECT vector_dims(embedding), count(*) FROM segments_with_video "
                   "WHERE embedding IS NOT NULL GROUP BY 1") == [(384, ROWS - 1)]
    assert execute("SELECT count(*) FROM segments WHERE embedding IS NULL AND text ~ '^[[:space:]]*$'") == [(1,)]
    ((wanted, text),) = execute("SELECT id, text FROM segments WHERE id = (SELECT min(id) + 7 FROM segments)")
    found = json.loads(run("search_segments", text, "--json"))
    assert (found["phase"], found["column"]) == ("final", "embedding")
    assert found["results"][0]["id"] == wanted and found["results"][0]["distance"] < 1e-3
    run("verify_embeddings")
    client.force_login(admin_user)
    changelist = client.get("/admin/segments/segment/", {"q": text})
    assert changelist.status_code == 200
    assert changelist.context["cl"].result_list[0].pk == wanted
    assert inspect().blocking == []

    # The application's own writes still fire its trigger: the checksums above could have failed.
    execute("UPDATE segments SET speaker_label = speaker_label WHERE id = %s", [wanted])
    assert checksums(columns)[wanted] != before[wanted]


class ZeroCostEncoder:
    """384-dim unit vectors from the text's hash: the backfill's database side, no model."""

    dimensions = 384

    def encode_documents(self, texts):
        vectors = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(384) for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    def check_dimensions(self, column, dimensions):
        assert dimensions == self.dimensions


def test_the_backfill_writes_vectors_without_firing_the_applications_trigger(original_table):
    original_table()
    load_rows(ROWS)
    adopt_and_expand()
    columns = data_columns()
    before = checksums(columns)

    report = run_backfill(ZeroCostEncoder(), batch_size=16)

    assert report.rows_embedded == ROWS - 1 and report.rows_blank == 1
    assert checksums(columns) == before
    assert execute("SELECT count(*) FROM segments WHERE embedding_384 IS NOT NULL") == [(ROWS - 1,)]
    assert execute("SHOW session_replication_role") == [("origin",)]  # only the writer's own session
    execute("UPDATE segments SET video_type = video_type WHERE id = (SELECT min(id) FROM segments)")
    assert checksums(columns) != before


@pytest.fixture
def login_role():
    """A DATABASE_URL for a role that is no superuser (grant_tables() lets it use the tables)."""
    execute(f"DROP ROLE IF EXISTS {ROLE}; CREATE ROLE {ROLE} LOGIN")
    params = connection.get_connection_params()
    yield f"postgresql://{ROLE}@/{params['dbname']}?host={params['host']}"
    execute(f"DROP OWNED BY {ROLE}; DROP ROLE {ROLE}")


def grant_tables(role):
    execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")


@pytest.mark.slow
def test_the_backfill_writes_nothing_where_its_role_may_not_keep_the_trigger_quiet(original_table, login_role):
    original_table()
    load_rows(ROWS)
    adopt_and_expand()
    grant_tables(ROLE)
    columns = data_columns()
    before = checksums(columns)

    process = manage("backfill_embeddings", env={"DATABASE_URL": login_role})
    out, err = process.communicate(timeout=900)

    assert process.returncode != 0 and "Traceback" not in err, out + err
    assert f"GRANT SET ON PARAMETER session_replication_role TO {ROLE};" in err
    assert "segments_set_updated_at" in err
    assert execute("SELECT count(embedding_384) FROM segments") == [(0,)]
    assert checksums(columns) == before
