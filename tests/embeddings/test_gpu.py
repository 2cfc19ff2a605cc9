"""On a CUDA device the service runs the model in fp16 and still returns float32 unit vectors
that agree with the CPU's. Skipped where torch sees no CUDA device."""
import numpy as np
import pytest

from embeddings.encoder import EmbeddingsService
from tests.conftest import MINILM_PATH

TEXTS = ["Red meat and LDL cholesterol.", "How long does keto adaptation take?", "🥩 " * 50]


@pytest.mark.gpu
def test_cuda_fp16_vectors_match_the_cpu(minilm):
    service = EmbeddingsService(model_name=MINILM_PATH, device="cuda", query_instruction="")
    vectors = service.encode_documents(TEXTS, texts_per_call=2)
    assert service.device.startswith("cuda")
    assert next(service.model.parameters()).dtype.itemsize == 2  # fp16 weights
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(vectors * minilm.encode_documents(TEXTS), axis=1)) > 0.99
