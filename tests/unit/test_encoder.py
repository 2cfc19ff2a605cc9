"""The embedding service: the configured model or a clear error, unit vectors, OOM handled."""
import numpy as np
import pytest
import torch

from embeddings.encoder import (
    BGE_QUERY_INSTRUCTION,
    DimensionMismatch,
    EmbeddingsService,
    ModelUnavailable,
    check_loadable,
    default_query_instruction,
    normalise,
)


def test_bge_english_models_get_their_query_instruction_and_others_none():
    assert default_query_instruction("BAAI/bge-small-en-v1.5") == BGE_QUERY_INSTRUCTION
    assert default_query_instruction("BAAI/bge-reranker-base") == ""
    assert default_query_instruction("/models/all-MiniLM-L6-v2") == ""


def test_an_unreachable_model_is_refused_at_once_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelUnavailable, match="set EMBEDDING_MODEL to a directory"):
        check_loadable("BAAI/bge-small-en-v1.5")
    check_loadable(str(tmp_path))  # a local directory is always tried


def test_documents_become_float32_unit_vectors_in_input_order(minilm):
    texts = ["Red meat and LDL cholesterol.", "", "🥩 steak and eggs", "x" * 100_000]
    vectors = minilm.encode_documents(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again = minilm.encode_documents(texts[::-1])[::-1]
    np.testing.assert_allclose(vectors, again, atol=1e-5)


def test_a_query_is_embedded_with_the_instruction(minilm):
    service = EmbeddingsService(model_name=minilm.model_name, device="cpu", query_instruction="query: ")
    service._model = minilm.model
    expected = minilm.encode_documents(["query: ketosis"])[0]
    np.testing.assert_allclose(service.encode_query("ketosis"), expected, atol=1e-5)


def test_a_model_of_the_wrong_width_is_refused_naming_both_numbers(minilm):
    service = EmbeddingsService(model_name=minilm.model_name, device="cpu", dimensions=768)
    service._model = minilm.model
    with pytest.raises(DimensionMismatch, match="384-dim vectors but EMBEDDING_DIMENSIONS is 768"):
        service.check_dimensions()
    with pytest.raises(DimensionMismatch, match="segments.embedding holds 1536"):
        minilm.check_dimensions("embedding", 1536)


class OutOfMemoryModel:
    """Fails like CUDA does above a number of texts per call; records the batches it was given. Has what the
    encode pipeline uses of a SentenceTransformer."""

    device = torch.device("cpu")
    max_seq_length = 512

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def eval(self):
        return self

    def preprocess(self, texts):
        return {"lengths": torch.tensor([float(len(t)) for t in texts])}

    def __call__(self, features):
        lengths = features["lengths"]
        self.calls.append(len(lengths))
        if len(lengths) > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"sentence_embedding": torch.stack([lengths, torch.ones_like(lengths)], dim=1)}


def test_cuda_out_of_memory_halves_the_texts_per_call_and_loses_no_text():
    service = EmbeddingsService(model_name="fake", device="cpu", texts_per_call=16, dimensions=2)
    service._model = OutOfMemoryModel(limit=4)
    texts = [f"t{'x' * i}" for i in range(10)]
    vectors = service.encode_documents(texts)
    assert vectors.shape == (10, 2)
    np.testing.assert_allclose(vectors, normalise([[len(t), 1.0] for t in texts]))
    assert max(service._model.calls[-3:]) <= 4


def test_normalise_keeps_zero_rows_zero():
    out = normalise([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
