"""The go/no-go evaluation with real models, built offline from the packaged MiniLM (embeddings/standins.py):

- after the first switch (MiniLM live), a next switch written by `makeswitch` to a model with randomly
  initialised weights (MiniLM's architecture): `embedding_eval` says NO-GO (exit 1) with the reason, the
  swap refuses it changing nothing, and `--accept-regression` lets it through;
- the same to MiniLM followed by a projection to 768 dims with orthonormal columns (every inner product
  kept, other vectors): GO (exit 0);
- before the first swap, with the legacy column's simulated vectors and no legacy model: the stored-vector
  mode runs and says so, GO or INCONCLUSIVE;
- the candidate comparison ranks the random-weights model last among MiniLM, MiniLM with CLS pooling and it.
"""
import importlib
import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from embeddings import ledger
from embeddings.encoder import EmbeddingsService
from segments.models import SwitchEvent
from segments.schema import embedding_schema, vector_column_types
from segments.switch import steps
from segments.switch.backfill import run_backfill
from tests.conftest import MINILM_PATH

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

COUNT = 200  # demo segments: enough known-item queries for a verdict, a few seconds for each model


def evaluate(*args):
    """(exit status, the JSON report, the text report) of `embedding_eval *args`, with --json and without."""
    out = StringIO()
    try:
        call_command("embedding_eval", "--json", "--latency-queries", "5", *args, stdout=out, stderr=StringIO())
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(out.getvalue())


@pytest.fixture
def minilm_live(segments_at, migrations_copy, settings, minilm, use_minilm):
    """The end of the first switch: `embedding` holds MiniLM's vectors of demo segments. Returns
    next_switch(model path, width): that model's switch written by makeswitch, applied, backfilled, indexed."""
    segments_at("final")
    call_command("load_demo_segments", count=COUNT, seed=7, stdout=StringIO())
    run_backfill(minilm)

    def next_switch(model, dimensions):
        settings.EMBEDDING_MODEL, settings.EMBEDDING_DIMENSIONS = model, dimensions
        settings.LEGACY_EMBEDDING_MODEL = MINILM_PATH
        call_command("makeswitch", stdout=StringIO())
        importlib.invalidate_caches()
        call_command("migrate", verbosity=0)
        run_backfill(EmbeddingsService(model_name=model, device="cpu", query_instruction=""))
        steps.index()

    return next_switch


def ledger_now():
    with connection.cursor() as cursor:
        return {column: str(entry.identity) for column, entry in ledger.entries(cursor, "segments").items()}


def test_a_model_with_random_weights_is_a_no_go_and_the_swap_refuses_it_unless_accepted(minilm_live, standin):
    minilm_live(standin("random"), 384)
    before = (embedding_schema().phase, vector_column_types(), ledger_now())
    swaps = SwitchEvent.objects.filter(step="swap").count()

    code, report = evaluate()

    assert (code, report["verdict"], report["mode"]) == (1, "NO-GO", "models")
    known = report["queries"]["known_item"]
    assert known["n"] >= 180 and known["change"]["change"] < -0.1 and known["change"]["high"] < 0
    assert any(reason.startswith("recall@10 fell from") for reason in report["reasons"])
    assert any("collapsed" in reason for reason in report["reasons"])  # caught whatever the queries say

    with pytest.raises(CommandError, match="(?s)Swap refused, nothing changed.*NO-GO.*--accept-regression"):
        call_command("embedding_switch", "swap", stdout=StringIO())
    assert (embedding_schema().phase, vector_column_types(), ledger_now()) == before
    assert SwitchEvent.objects.filter(step="swap").count() == swaps

    call_command("embedding_switch", "swap", "--accept-regression", stdout=StringIO())

    assert embedding_schema().phase == "swapped"
    assert SwitchEvent.objects.filter(step="eval-accepted").count() == 1


def test_a_model_that_keeps_minilms_geometry_in_other_vectors_is_a_go(minilm_live, standin):
    minilm_live(standin("orthonormal"), 768)

    code, report = evaluate()

    assert (code, report["verdict"], report["mode"]) == (0, "GO", "models")
    known = report["queries"]["known_item"]
    assert known["n"] >= 180 and known["change"]["low"] >= -0.02
    assert known["agreement"]["overlap_at_10"] > 0.9  # the same rankings, from other vectors
    assert report["new"]["dimensions"] == 768 and report["health"]["new"]["problems"] == []


def test_before_the_first_swap_without_the_legacy_model_the_stored_vector_mode_judges(segments_at, minilm, use_minilm):
    segments_at("expanded")
    call_command("load_demo_segments", count=COUNT, seed=7, stdout=StringIO())
    run_backfill(minilm)
    steps.index()
    out = StringIO()

    try:
        call_command("embedding_eval", "--queries", "60", stdout=out, stderr=StringIO())
        code = 0
    except SystemExit as exc:
        code = exc.code

    text = out.getvalue()
    assert code in (0, 3)
    assert "mode: stored (the old model cannot run here: segments.embedding holds simulated vectors" in text
    assert ("Verdict: GO" in text) == (code == 0) and ("Verdict: INCONCLUSIVE" in text) == (code == 3)
    assert "stored-vector neighbours (judged)" in text and "known-item queries: 60 of 60" in text


def test_the_candidate_comparison_ranks_the_model_with_random_weights_last(segments_at, standin):
    segments_at("expanded")
    call_command("load_demo_segments", count=400, seed=9, stdout=StringIO())
    names = [MINILM_PATH, standin("cls"), standin("random")]
    out = StringIO()

    call_command("embedding_eval", "--json", *[f"--candidate={name}" for name in names], "--sample", "250",
                 "--queries", "120", stdout=out, stderr=StringIO())

    found = json.loads(out.getvalue())
    ranked = [entry["model"] for entry in found["candidates"]]
    assert sorted(ranked) == sorted(names) and ranked[-1] == standin("random")
    last = found["candidates"][-1]
    assert any("collapsed" in problem for problem in last["health"]["problems"])
    assert all(entry["texts_per_second"] > 0 and entry["bytes_per_row"] == 776 for entry in found["candidates"])
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM segments WHERE embedding_384 IS NOT NULL")
        assert cursor.fetchone() == (0,)  # scratch space only: nothing was written to the table
