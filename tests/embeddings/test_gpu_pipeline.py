"""The encode pipeline and the service on CUDA: fp16, pinned asynchronous copies, one device per
worker, texts per call measured on the device, a stream of claims copied back item by item.
Skipped where torch sees no CUDA device."""
import numpy as np
import pytest
import torch

from embeddings import pipeline
from embeddings.encoder import MEASURE_TEXTS, EmbeddingsService
from segments.demo_data import generate_texts
from tests.conftest import MINILM_PATH

pytestmark = pytest.mark.gpu


def test_fp16_pipeline_vectors_match_plain_encode_on_the_cpu(minilm):
    texts = generate_texts(300, seed=5) + ["", "🥩 " * 50, "x" * 5000]
    service = EmbeddingsService(model_name=MINILM_PATH, device="cuda", query_instruction="")
    vectors = service.encode_documents(texts, texts_per_call=64)
    assert next(service.model.parameters()).dtype == torch.float16
    reference = minilm.model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    assert np.min(np.sum(vectors * reference, axis=1)) > 0.99


def test_a_worker_device_places_the_model_on_that_gpu():
    last = torch.cuda.device_count() - 1
    service = EmbeddingsService(model_name=MINILM_PATH, device=f"cuda:{last}", query_instruction="")
    service.encode_documents(["steak and eggs"])
    assert service.device == f"cuda:{last}"


def test_the_cuda_texts_per_call_are_measured_on_the_first_large_call():
    service = EmbeddingsService(model_name=MINILM_PATH, device="cuda", query_instruction="")
    service.encode_documents(generate_texts(MEASURE_TEXTS, seed=6))
    assert set(service.measured_texts_per_call) <= set(pipeline.CUDA_TEXTS_PER_CALL_CANDIDATES)
    assert service.texts_per_call == max(service.measured_texts_per_call, key=service.measured_texts_per_call.get)


def test_a_stream_of_claims_on_cuda_gives_each_the_vectors_of_its_own_call(minilm):
    service = EmbeddingsService(model_name=MINILM_PATH, device="cuda", query_instruction="", texts_per_call=64)
    items = [(number, generate_texts(size, seed=number)) for number, size in enumerate((700, 1, 300, 0, 1000))]
    results = list(service.encode_documents_streamed(iter(items)))
    assert [result.key for result in results] == [0, 1, 2, 3, 4] and all(r.error is None for r in results)
    for result, (_, texts) in zip(results, items):
        assert result.vectors.shape == (len(texts), 384) and result.vectors.dtype == np.float32
        np.testing.assert_allclose(result.vectors, service.encode_documents(texts), atol=1e-3)
    reference = minilm.encode_documents(items[2][1])
    assert np.min(np.sum(results[2].vectors * reference, axis=1)) > 0.99
