"""The reranker, offline: a CrossEncoder built from the packaged MiniLM files.

Its classification head is untrained (random), so its scores mean nothing: these tests prove
the plumbing (scores of the right pairs, ordering by score, top-k, batches, the 512-token cap,
lazy thread-safe loading) and that a fallback or a disabled reranker is always reported.
"""
import json
import threading
import time
from io import StringIO

import pytest
from django.db import connection
import torch
from django.core.management import call_command

from embeddings.reranker import FALLBACK_MODEL, Reranker, RerankerUnavailable, get_reranker, load_cross_encoder
from segments.models import Segment
from segments.search import search
from tests.conftest import MINILM_PATH

LARGE = "BAAI/bge-reranker-large"
QUERY = "does fasting lower insulin"
DOCUMENTS = [
    "Fasting lowers insulin within a day.",
    "Red meat is rich in protein and fat.",
    "Plants produce toxins to deter animals.",
    "Insulin resistance improves on a low-carbohydrate diet.",
    "He went for a long walk by the river.",
    "Ketones fuel the brain during a fast.",
    "The video was recorded in a studio.",
    "Sleep quality improves without sugar.",
    "Blood glucose stays stable while fasting.",
    "Cholesterol is made by the liver.",
]


@pytest.fixture(scope="session")
def cross_encoder():
    """The packaged MiniLM as a CrossEncoder (loaded once)."""
    return load_cross_encoder(MINILM_PATH, device="cpu", max_length=512)


def serving(model, calls=None):
    """A loader that hands out the already loaded `model` and records the names asked for."""
    def loader(name, **kwargs):
        if calls is not None:
            calls.append(name)
        return model
    return loader


@pytest.fixture
def reranker(cross_encoder):
    return Reranker(MINILM_PATH, device="cpu", batch_size=4, loader=serving(cross_encoder))


def record_batches(model):
    """Shapes (pairs, tokens) of every batch the model runs, through a forward hook."""
    shapes = []
    handle = model.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0]["input_ids"].shape)))
    return shapes, handle


def test_scores_are_the_models_scores_of_each_query_document_pair(reranker, cross_encoder):
    ranked = reranker.rerank(QUERY, DOCUMENTS, top_k=len(DOCUMENTS))

    one_by_one = [float(cross_encoder.predict([(QUERY, document)], batch_size=1)[0]) for document in DOCUMENTS]
    assert sorted(item.index for item in ranked) == list(range(len(DOCUMENTS)))
    assert [item.score for item in ranked] == pytest.approx([one_by_one[item.index] for item in ranked], abs=1e-4)


def test_documents_come_best_score_first_and_top_k_keeps_the_best(reranker):
    everything = reranker.rerank(QUERY, DOCUMENTS, top_k=len(DOCUMENTS))
    best_three = reranker.rerank(QUERY, DOCUMENTS, top_k=3)

    scores = [item.score for item in everything]
    assert scores == sorted(scores, reverse=True)
    assert [item.index for item in best_three] == [item.index for item in everything[:3]]


def test_top_k_defaults_to_return_top_k(reranker, settings):
    settings.RETURN_TOP_K = 2

    assert len(reranker.rerank(QUERY, DOCUMENTS)) == 2


def test_pairs_are_scored_in_batches_of_rerank_batch_size(cross_encoder, settings):
    settings.RERANK_BATCH_SIZE = 3
    shapes, handle = record_batches(cross_encoder)
    try:
        Reranker(MINILM_PATH, device="cpu", loader=serving(cross_encoder)).score(QUERY, DOCUMENTS)
    finally:
        handle.remove()

    assert [pairs for pairs, _ in shapes] == [3, 3, 3, 1]


def test_long_inputs_are_capped_at_512_tokens(reranker, cross_encoder):
    long_document = "fasting and insulin and metabolism " * 400  # ~2,000 tokens
    shapes, handle = record_batches(cross_encoder)
    try:
        scores = reranker.score(QUERY, [long_document, "short"])
    finally:
        handle.remove()

    assert len(scores) == 2
    assert max(tokens for _, tokens in shapes) == 512


def test_the_model_loads_on_first_use_and_once_across_threads(cross_encoder):
    calls = []

    def slow_loader(name, **kwargs):
        calls.append(name)
        time.sleep(0.2)
        return cross_encoder

    reranker = Reranker(MINILM_PATH, device="cpu", loader=slow_loader)
    assert calls == []
    threads = [threading.Thread(target=reranker.score, args=(QUERY, DOCUMENTS[:2])) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert calls == [MINILM_PATH]


@pytest.mark.parametrize("error", [
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.25 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
])
def test_a_model_too_large_for_memory_falls_back_to_base_and_says_so(cross_encoder, error):
    calls = []

    def loader(name, **kwargs):
        calls.append(name)
        if name == LARGE:
            raise error
        return cross_encoder

    reranker = Reranker(LARGE, device="cpu", loader=loader)
    ranked = reranker.rerank(QUERY, DOCUMENTS, top_k=2)

    assert calls == [LARGE, FALLBACK_MODEL]
    assert len(ranked) == 2 and reranker.loaded_model_name == FALLBACK_MODEL
    assert len(reranker.notes) == 1
    assert f"{LARGE} could not be loaded for lack of memory" in reranker.notes[0]
    assert f"fell back to {FALLBACK_MODEL}" in reranker.notes[0]


def test_other_load_errors_do_not_fall_back(cross_encoder):
    calls = []

    def loader(name, **kwargs):
        calls.append(name)
        raise RerankerUnavailable(f"RERANKER_MODEL={name!r} could not be loaded: corrupt file")

    with pytest.raises(RerankerUnavailable, match="corrupt file"):
        Reranker(LARGE, device="cpu", loader=loader).score(QUERY, DOCUMENTS)
    assert calls == [LARGE]


def test_when_the_fallback_cannot_load_either_the_error_says_both(cross_encoder):
    def loader(name, **kwargs):
        if name == LARGE:
            raise MemoryError()
        raise RerankerUnavailable(f"RERANKER_MODEL={name!r} is not in the cache")

    with pytest.raises(RerankerUnavailable, match="lack of memory.*neither could its fallback"):
        Reranker(LARGE, device="cpu", loader=loader).score(QUERY, DOCUMENTS)


def test_a_model_that_cannot_be_found_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    expected = "RERANKER_MODEL='no-such-org/no-such-reranker'.*ENABLE_RERANKER=false"
    with pytest.raises(RerankerUnavailable, match=expected):
        Reranker("no-such-org/no-such-reranker", device="cpu").score(QUERY, DOCUMENTS)


def test_one_reranker_per_configured_model(settings):
    settings.RERANKER_MODEL = MINILM_PATH
    first = get_reranker()
    assert get_reranker() is first

    settings.RERANKER_MODEL = LARGE
    assert get_reranker() is not first


# --- Through the search ------------------------------------------------------------------------

def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only (see tests/db/test_search.py)."""
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


@pytest.fixture
def corpus(db, minilm):
    """The documents as segments, embedded with MiniLM."""
    vectors = minilm.encode_documents(DOCUMENTS)
    segments = [Segment.objects.create(video_id="v1", start_sec=i, end_sec=i + 1, text=text, embedding=vector)
                for i, (text, vector) in enumerate(zip(DOCUMENTS, vectors))]
    rebuild_vector_index()
    return segments


def test_search_reranks_the_nearest_candidates_and_returns_the_best_k(corpus, minilm, reranker, settings):
    settings.RERANK_TOP_K = 6
    nearest_six = search(QUERY, k=6, encoder=minilm)

    results = search(QUERY, k=3, rerank=True, encoder=minilm, reranker=reranker)

    expected = reranker.rerank(QUERY, [hit.segment.text for hit in nearest_six], top_k=3)
    assert [hit.segment.pk for hit in results] == [nearest_six.hits[item.index].segment.pk for item in expected]
    assert [hit.rerank_score for hit in results] == pytest.approx([item.score for item in expected], abs=1e-4)
    assert results.reranked and results.reranker_model == MINILM_PATH and results.notes == []
    base_distance = {hit.segment.pk: hit.distance for hit in nearest_six}
    assert [hit.distance for hit in results] == pytest.approx([base_distance[hit.segment.pk] for hit in results])


def test_search_reports_the_fallback_model(corpus, minilm, cross_encoder):
    def loader(name, **kwargs):
        if name == LARGE:
            raise MemoryError()
        return cross_encoder

    results = search(QUERY, k=2, rerank=True, encoder=minilm, reranker=Reranker(LARGE, device="cpu", loader=loader))

    assert results.reranker_model == FALLBACK_MODEL
    assert any(f"fell back to {FALLBACK_MODEL}" in note for note in results.notes)


def test_search_without_a_loadable_reranker_says_reranking_was_disabled(corpus, minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = search(QUERY, k=3, encoder=minilm)

    results = search(QUERY, k=3, rerank=True, encoder=minilm, reranker=Reranker("no-such-org/no-such-reranker"))

    assert not results.reranked
    assert [hit.segment.pk for hit in results] == [hit.segment.pk for hit in base]
    assert all(hit.rerank_score is None for hit in results)
    assert len(results.notes) == 1 and results.notes[0].startswith("Reranking disabled: RERANKER_MODEL=")


def test_the_command_prints_reranker_scores_and_warnings(corpus, minilm, reranker, monkeypatch):
    out = StringIO()
    call_command("search_segments", QUERY, "--rerank", "--k", "2", "--json", stdout=out, encoder=minilm,
                 reranker=reranker)
    payload = json.loads(out.getvalue())
    assert payload["reranked"] and [type(row["rerank_score"]) for row in payload["results"]] == [float, float]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, err = StringIO(), StringIO()
    call_command("search_segments", QUERY, "--rerank", "--k", "2", stdout=out, stderr=err, encoder=minilm,
                 reranker=Reranker("no-such-org/no-such-reranker"))
    assert "Reranking disabled" in err.getvalue()
    assert "score" not in out.getvalue()
