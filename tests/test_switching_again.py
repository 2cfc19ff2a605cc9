"""Three switches in a row, on demo data and on the original project's own table, each driven by
the README's blocks as written: the runbook (1536 -> 384, MiniLM; on the original table after the
adoption block), then "Switching again" twice (-> another 384-dim model, MiniLM with CLS pooling;
-> a 768-dim model, MiniLM projected), with a plain `migrate` between every two steps.

`makeswitch` writes its migrations where the segments app's migrations are: here a copy of them
(the `migrations_copy` fixture), as they would be in a checkout. The commands
run in this process (call_command), so each model loads once.
"""
import importlib
import json
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

from embeddings import ledger
from embeddings.encoder import EmbeddingsService
from segments.schema import embedding_schema, vector_column_types
from segments.switch import preflight
from tests import readme
from tests.conftest import MINILM_PATH
from tests.migrations.original_schema import (  # noqa: F401 (fixture)
    checksums, data_columns, execute, load_rows, original_table,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.end_to_end]


def command(*args):
    out = StringIO()
    try:
        call_command(*args, stdout=out, stderr=StringIO())
    except SystemExit as exc:  # embedding_eval exits with its verdict: 3 is INCONCLUSIVE (150 segments are few)
        assert args[0] == "embedding_eval" and exc.code == 3, out.getvalue()
    return out.getvalue()


def state():
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM django_migrations WHERE app = 'segments' ORDER BY id")
        applied = [row[0] for row in cursor.fetchall()]
    return embedding_schema().phase, vector_column_types(), applied


def run_block(block):
    """Each line of a README block, with a plain `migrate` between every two: it must change nothing
    (before a line that is itself a `migrate`, as after makeswitch, that line is the check)."""
    outputs = []
    for number, argv in enumerate(block):
        if number and readme.manage_args(argv)[0] != "migrate":
            before = state()
            command("migrate")
            assert state() == before, f"a plain migrate after {' '.join(block[number - 1])} changed the table"
        importlib.invalidate_caches()  # makeswitch has just written migration files
        outputs.append(command(*readme.manage_args(argv)))
        blocking = preflight.inspect().blocking
        assert not blocking, f"after {' '.join(argv)} the pre-flight finds: {blocking}"
    return outputs


def data_checksums():
    """md5 of every non-vector value, per segment."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, md5(row(id, video_id, start_sec, end_sec, text, speaker_label, created_at, "
                       "video_type)::text) FROM segments ORDER BY id")
        return dict(cursor.fetchall())


def assert_the_switch_ended_with(model, dimensions, storage):
    schema = embedding_schema()
    assert (schema.phase, vector_column_types()) == ("final", {"embedding": (storage, dimensions)})
    with connection.cursor() as cursor:
        recorded = ledger.entry(cursor, "segments", "embedding")
        cursor.execute("SELECT id, text, embedding::real[] FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        rows = cursor.fetchall()
    assert recorded.identity.name == model.model_name
    assert ledger.same_model(ledger.identity_of(model), recorded.identity)[0]
    stored = np.array([vector for _, _, vector in rows], dtype=np.float32)
    fresh = model.encode_documents([text for _, text, _ in rows])
    assert float(np.min(np.sum(stored * fresh, axis=1))) >= 0.999  # every vector is this model's
    segment_id, text = next((i, t) for i, t, _ in rows if 40 < len(t) < 300)
    found = json.loads(command("search_segments", text, "--k", "1", "--json"))
    assert found["results"][0]["id"] == segment_id  # the search embeds questions with this model


def configure(settings, model, dimensions, storage=None, replaced=None):
    settings.EMBEDDING_MODEL, settings.EMBEDDING_DIMENSIONS, settings.EMBEDDING_STORAGE = model, dimensions, storage
    settings.LEGACY_EMBEDDING_MODEL = replaced or settings.LEGACY_EMBEDDING_MODEL
    settings.EMBEDDING_DEVICE, settings.EMBEDDING_QUERY_INSTRUCTION = "cpu", ""
    return EmbeddingsService(model_name=model, device="cpu", query_instruction="")


def test_three_switches_in_a_row_from_the_readme_on_demo_data(segments_at, migrations_copy, settings, standin):
    segments_at("legacy")
    call_command("load_demo_segments", count=150, seed=5, verbosity=0)
    before = data_checksums()

    minilm = configure(settings, MINILM_PATH, 384)
    run_block(readme.runbook())
    assert_the_switch_ended_with(minilm, 384, "halfvec")

    other_384 = configure(settings, standin("cls"), 384, replaced=MINILM_PATH)
    outputs = run_block(readme.switching_again())
    assert "Switch 2" in outputs[0] and "embedding_next" in outputs[1]
    assert_the_switch_ended_with(other_384, 384, "halfvec")

    wider = configure(settings, standin(768), 768, storage="vector", replaced=standin("cls"))
    run_block(readme.switching_again())
    assert_the_switch_ended_with(wider, 768, "vector")

    assert data_checksums() == before
    assert sorted(path.name for path in migrations_copy.glob("0*_switch_*.py"))[-1] == "0022_switch_3_contract.py"
    assert "No changes detected" in command("makemigrations", "--check", "--dry-run")
    with connection.cursor() as cursor:
        history = [(entry.column, entry.identity.name, retired is not None)
                   for entry, retired in ledger.history(cursor, "segments")]
    assert history[-1] == ("embedding", standin(768), False)
    assert [(name, retired) for _, name, retired in history if name in (MINILM_PATH, standin("cls"))] == [
        (MINILM_PATH, True), (standin("cls"), True)]


def test_three_switches_in_a_row_from_the_readme_on_the_original_projects_table(
        original_table, migrations_copy, settings, standin):
    original_table()
    load_rows(60)
    columns = data_columns()
    before = checksums(columns)

    minilm = configure(settings, MINILM_PATH, 384)
    run_block(readme.adoption())  # the pre-flight, `migrate --fake-initial`, then the runbook
    assert_the_switch_ended_with(minilm, 384, "halfvec")
    assert checksums(columns) == before

    other_384 = configure(settings, standin("cls"), 384, replaced=MINILM_PATH)
    run_block(readme.switching_again())
    assert_the_switch_ended_with(other_384, 384, "halfvec")
    assert checksums(columns) == before

    wider = configure(settings, standin(768), 768, storage="vector", replaced=standin("cls"))
    run_block(readme.switching_again())
    assert_the_switch_ended_with(wider, 768, "vector")
    assert checksums(columns) == before  # every value but the vectors, the original project's columns included
    assert execute("SELECT vector_dims(embedding), count(*) FROM segments_with_video "
                   "WHERE embedding IS NOT NULL GROUP BY 1") == [(768, 59)]  # its view serves the live column
