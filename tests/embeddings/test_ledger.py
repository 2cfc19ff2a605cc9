"""The model ledger: one model's vectors per column, and no question embedded with another model.

The second model is real: the packaged MiniLM with CLS pooling instead of mean pooling, 384
dimensions like the first (embeddings/standins.py).
"""
import json
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from embeddings import ledger
from embeddings.encoder import EmbeddingsService
from segments.search import search
from segments.switch import steps
from segments.switch.backfill import count_pending, run_backfill
from segments.switch.verify import verify
from tests.conftest import MINILM_PATH, manage
from tests.embeddings.conftest import add_segments, scalar, sentences, stored_vectors

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture(scope="module")
def cls_model(standin):
    return EmbeddingsService(model_name=standin("cls"), device="cpu", query_instruction="")


def recorded(column):
    with connection.cursor() as cursor:
        return ledger.entry(cursor, "segments", column)


def vectors_match(encoder, column):
    """The lowest cosine between each stored vector of `column` and `encoder`'s vector of its text."""
    stored = {i: v for i, v in stored_vectors(column).items() if v is not None}
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM segments WHERE id = ANY(%s) ORDER BY id", [list(stored)])
        texts = dict(cursor.fetchall())
    ids = sorted(stored)
    fresh = np.asarray(encoder.encode_documents([texts[i] for i in ids]))
    return float((fresh * np.stack([stored[i] for i in ids])).sum(axis=1).min())


def test_fingerprints_tell_two_models_of_one_width_apart_and_ignore_rounding(minilm, cls_model):
    mean, cls = ledger.identity_of(minilm), ledger.identity_of(cls_model)
    rounded = ledger.ModelIdentity(mean.name, mean.dimensions,
                                   tuple(tuple(np.float16(x).item() for x in row) for row in mean.fingerprint))

    assert (mean.dimensions, cls.dimensions) == (384, 384)
    assert ledger.same_model(mean, rounded)[0]  # the same model in fp16 (a GPU) is the same model
    same, cosine = ledger.same_model(mean, cls)
    assert not same and cosine < 0.9
    assert mean.short_fingerprint != cls.short_fingerprint


def test_a_second_model_of_the_same_width_is_refused_before_writing_a_row(segments_at, minilm, cls_model):
    segments_at("expanded")
    add_segments(sentences(30))
    run_backfill(minilm)
    first = recorded("embedding_384")
    add_segments(sentences(10, seed=1))

    with pytest.raises(CommandError) as refused:
        call_command("backfill_embeddings", encoder=cls_model, verbosity=0)

    message = str(refused.value)
    assert "all-MiniLM-L6-v2 with CLS pooling" in message and "all-MiniLM-L6-v2, from a local directory" in message
    assert "Nothing was written" in message and "EMBEDDING_MODEL back" in message and "makeswitch" in message
    assert count_pending() == 10 and recorded("embedding_384") == first
    assert first.source == "first write" and first.identity.name == MINILM_PATH
    assert vectors_match(minilm, "embedding_384") >= 0.999


def test_two_machines_with_different_models_never_fill_one_column_with_both(segments_at, standin):
    segments_at("expanded")
    add_segments(sentences(120))
    runs = [manage("backfill_embeddings", "--batch-size", "20", env={"EMBEDDING_MODEL": model})
            for model in (MINILM_PATH, standin("cls"))]
    try:
        outcomes = []
        for run in runs:
            _, err = run.communicate(timeout=120)
            outcomes.append((run.returncode, err))
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()

    winner = recorded("embedding_384").identity.name
    loser = 1 - [MINILM_PATH, standin("cls")].index(winner)
    assert outcomes[1 - loser][0] == 0
    assert outcomes[loser][0] != 0 and "Nothing was written" in outcomes[loser][1]
    model = EmbeddingsService(model_name=winner, device="cpu", query_instruction="")
    assert vectors_match(model, "embedding_384") >= 0.999  # every vector is the winner's


def test_a_search_with_another_model_is_refused_naming_both(segments_at, minilm, cls_model, settings):
    segments_at("expanded")
    add_segments(sentences(20))
    run_backfill(minilm)

    with pytest.raises(ledger.ModelMismatch, match=r"holds the vectors of all-MiniLM-L6-v2, from a local directory.*"
                                                  r"this search uses all-MiniLM-L6-v2 with CLS pooling.*"
                                                  r"No question was embedded"):
        search("fasting and insulin", encoder=cls_model)
    settings.EMBEDDING_MODEL, settings.EMBEDDING_QUERY_INSTRUCTION = cls_model.model_name, ""
    with pytest.raises(CommandError, match="CLS pooling"):
        call_command("search_segments", "fasting and insulin", stdout=StringIO())
    assert search("fasting and insulin", encoder=minilm).hits  # the column's own model searches it


def test_verify_refuses_to_embed_with_another_model(segments_at, minilm, cls_model):
    segments_at("expanded")
    add_segments(sentences(20))
    run_backfill(minilm)
    steps.index(force=True)

    report = verify(sample=10, encoder=cls_model).as_dict()

    assert report["passed"] is False
    assert report["checks"]["model"]["ok"] is False and "CLS pooling" in report["checks"]["model"]["message"]
    assert report["checks"]["stale"]["ok"] is None


def test_the_swap_refuses_another_model_for_its_late_arrivals_before_any_lock(segments_at, minilm, cls_model, schema_dump):
    segments_at("expanded")
    add_segments(sentences(20))
    run_backfill(minilm)
    steps.index(force=True)
    add_segments(["arrived after the last pass"])
    before = schema_dump()

    with pytest.raises(ledger.ModelMismatch, match="CLS pooling"):
        steps.swap(encoder=cls_model, backfill=lambda encoder: None)

    assert schema_dump() == before and count_pending() == 1


def test_a_column_written_before_the_ledger_is_adopted_on_evidence_or_refused(segments_at, minilm, cls_model):
    segments_at("expanded")
    ids = add_segments(sentences(12))
    vectors = minilm.encode_documents(sentences(12))
    with connection.cursor() as cursor:  # written as an older version of this project wrote them: no ledger row
        for segment_id, vector in zip(ids, vectors):
            cursor.execute("UPDATE segments SET embedding_384 = %s::vector WHERE id = %s",
                           ["[" + ",".join(map(str, vector)) + "]", segment_id])
    add_segments(["one more segment"])

    with pytest.raises(ledger.ModelMismatch, match=r"holds vectors no model is recorded for.*Nothing was written"):
        run_backfill(cls_model)
    assert recorded("embedding_384") is None and count_pending() == 1

    assert run_backfill(minilm).rows_embedded == 1
    assert recorded("embedding_384").source == "adopted (8 vectors matched)"


def test_the_legacy_column_is_declared_and_status_shows_each_columns_model(segments_at, minilm):
    segments_at("expanded")
    add_segments(sentences(5))
    run_backfill(minilm)

    out = StringIO()
    call_command("embedding_status", stdout=out)
    status = json.loads(_status_json())

    legacy, new = status["models"]["embedding"], status["models"]["embedding_384"]
    assert (legacy["model"], legacy["source"], legacy["fingerprint"]) == (
        "Alibaba-NLP/gte-Qwen2-1.5B-instruct", "declared", None)
    assert (new["model"], new["source"], new["dimensions"]) == (MINILM_PATH, "first write", 384)
    assert new["fingerprint"] == ledger.identity_of(minilm).short_fingerprint
    text = out.getvalue()
    assert "the original project's model (Alibaba-NLP/gte-Qwen2-1.5B-instruct), 1536 dims, not fingerprinted" in text
    assert f"fingerprint {new['fingerprint']}" in text


def _status_json():
    out = StringIO()
    call_command("embedding_status", "--json", stdout=out)
    return out.getvalue()


def test_a_plain_migrate_declares_the_legacy_model_from_the_setting(segments_at, settings):
    settings.LEGACY_EMBEDDING_MODEL = "some-org/the-old-model"
    segments_at("legacy")

    call_command("migrate", verbosity=0)

    assert recorded("embedding").identity.name == "some-org/the-old-model"
    assert scalar("SELECT count(*) FROM embeddings_vector_column WHERE retired_at IS NULL") == 1
