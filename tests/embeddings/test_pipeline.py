"""The encode pipeline (embeddings/pipeline.py) with the packaged all-MiniLM-L6-v2 on the CPU: the
same vectors as plain SentenceTransformer.encode, text by text, in input order."""
import threading

import numpy as np
import pytest
import torch

from embeddings import pipeline
from segments.demo_data import generate_texts

EDGE_TEXTS = ["", "   ", "🥩 " * 50, "x" * 5000, "Ärzte über Ernährung", "אכילת בשר בלבד", "a"]


def plain(model, texts):
    return model.encode(texts, normalize_embeddings=True, show_progress_bar=False)


def cosines(vectors, reference):
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.sum(vectors * reference, axis=1)


@pytest.mark.parametrize("texts_per_call", [1, 3, 16])
def test_every_text_gets_plain_encodes_vector(minilm, texts_per_call):
    texts = generate_texts(60, seed=2) + EDGE_TEXTS
    vectors = pipeline.encode(minilm.model, texts, texts_per_call)
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    assert cosines(vectors, plain(minilm.model, texts)).min() >= 0.999


def test_the_service_returns_unit_vectors_in_input_order(minilm):
    texts = generate_texts(40, seed=3)
    order = np.random.default_rng(0).permutation(len(texts))
    vectors = minilm.encode_documents(texts)
    shuffled = minilm.encode_documents([texts[i] for i in order])
    np.testing.assert_allclose(shuffled, vectors[order], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


class FailingModel:
    """Stands for a SentenceTransformer whose tokenizer fails on one text."""

    device = torch.device("cpu")
    max_seq_length = 512

    def eval(self):
        return self

    def preprocess(self, texts):
        if "bad" in texts:
            raise ValueError("tokenizer exploded")
        return {"input_ids": torch.ones((len(texts), 4), dtype=torch.long)}

    def __call__(self, features):
        return {"sentence_embedding": torch.ones((len(features["input_ids"]), 2))}


def test_a_tokenizer_error_reaches_the_caller_and_leaves_no_thread():
    threads = threading.active_count()
    with pytest.raises(ValueError, match="tokenizer exploded"):
        pipeline.encode(FailingModel(), ["good one", "bad", "another good one"], texts_per_call=1)
    assert threading.active_count() == threads


def test_fastest_texts_per_call_picks_one_of_those_it_measured(minilm):
    chosen, rates = pipeline.fastest_texts_per_call(minilm.model, generate_texts(16, seed=4), candidates=(4, 8), repeats=1)
    assert set(rates) == {4, 8} and chosen in rates and all(rate > 0 for rate in rates.values())
