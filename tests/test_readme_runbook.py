"""The README's runbook, command by command as it is written there, on a table with data.

The commands are read from README.md itself (its first `sh` block after "## The runbook", and
the block after "**Undo.**"), so the README cannot drift from what works. Between every two
steps a plain `manage.py migrate` runs, as a deploy would: it must exit 0 and change nothing.
"""
import json

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

from segments.schema import embedding_schema
from tests import readme
from tests.conftest import manage


def run(argv):
    """Run one README line (`python manage.py ...`) against the test database; its output."""
    process = manage(*readme.manage_args(argv))
    out, err = process.communicate(timeout=600)
    verdict = argv[2] == "embedding_eval" and process.returncode == 3  # INCONCLUSIVE: too few segments to judge
    assert process.returncode == 0 or verdict, f"{' '.join(argv)} exited {process.returncode}:\n{out}\n{err}"
    return out


def state():
    """What a plain migrate must never change: the phase, the vector columns, applied migrations."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'segments'::regclass "
                       "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")
        columns = [row[0] for row in cursor.fetchall()]
        cursor.execute("SELECT app, name FROM django_migrations WHERE app = 'segments' ORDER BY id")
        applied = cursor.fetchall()
    return embedding_schema().phase, columns, applied


def plain_migrate_changes_nothing():
    before = state()
    out = run(["python", "manage.py", "migrate"])
    assert state() == before
    assert "next:" in out  # it says where the switch stands and what comes next


@pytest.fixture
def legacy_table_with_data(segments_at):
    segments_at("legacy")
    call_command("load_demo_segments", count=150, seed=11, verbosity=0)


@pytest.mark.end_to_end
@pytest.mark.slow
def test_the_runbook_as_written_completes_the_switch(legacy_table_with_data, minilm):
    commands = readme.runbook()
    assert [argv[2] for argv in commands][0] == "migrate"

    outputs = {}
    for number, argv in enumerate(commands):
        if number:
            plain_migrate_changes_nothing()
        outputs[" ".join(argv[2:])] = run(argv)

    assert embedding_schema().phase == "final"
    # The last step left nothing for a deploy's plain migrate, and the status nothing to run.
    plain_migrate_changes_nothing()
    found = json.loads(run(["python", "manage.py", "embedding_status", "--json"]))
    assert found["migrations_waiting"] == [] and found["next"]["command"] is None, found["next"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text, embedding::real[] FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        rows = cursor.fetchall()
        cursor.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'segments_embedding_hnsw'::regclass")
        assert cursor.fetchone() == (True,)
    assert all(vector is not None for _, _, vector in rows)
    stored = np.array([np.asarray(vector, dtype=np.float32) for _, _, vector in rows])
    fresh = minilm.encode_documents([text for _, text, _ in rows])
    assert np.min(np.sum(stored * fresh, axis=1)) >= 0.999
    # A segment's own text, searched through the command, finds that segment first.
    segment_id, text = next((i, t) for i, t, _ in rows if 40 < len(t) < 300)
    found = run(["python", "manage.py", "search_segments", text, "--k", "1", "--json"])
    assert f'"id": {segment_id}' in found


@pytest.mark.end_to_end
@pytest.mark.slow
def test_the_readme_undo_restores_the_legacy_search_and_migrate_keeps_it(legacy_table_with_data):
    commands = readme.runbook()
    for argv in commands[: [a[2:4] for a in commands].index(["embedding_switch", "swap"]) + 1]:
        run(argv)
    assert embedding_schema().phase == "swapped"
    plain_migrate_changes_nothing()  # after the swap: the legacy column stays

    for argv in readme.undo():
        run(argv)

    schema = embedding_schema()
    assert (schema.phase, schema.legacy_column, schema.legacy_dimensions) == ("expanded", "embedding", 1536)
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM segments WHERE embedding IS NULL AND text ~ '[^[:space:]]'")
        assert cursor.fetchone() == (0,)  # nothing edited since the swap: every legacy vector is back
    plain_migrate_changes_nothing()
