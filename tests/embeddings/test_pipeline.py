"""The encode pipeline (embeddings/pipeline.py) with the packaged all-MiniLM-L6-v2 on the CPU: the
same vectors as plain SentenceTransformer.encode, text by text, in input order, however many threads
tokenize; the direct tokenizer gives `model.preprocess`'s features exactly; a stream of items gives
each item the vectors of its own call."""
import threading

import numpy as np
import pytest
import torch

from embeddings import pipeline, tokenization
from embeddings.stream import EncodeStream
from segments.demo_data import generate_texts

EDGE_TEXTS = ["", "   ", "🥩 " * 50, "x" * 5000, "Ärzte über Ernährung", "אכילת בשר בלבד", "a"]


def plain(model, texts):
    return model.encode(texts, normalize_embeddings=True, show_progress_bar=False)


def cosines(vectors, reference):
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.sum(vectors * reference, axis=1)


def encoder_threads():
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("encode-")]


@pytest.mark.parametrize("texts_per_call", [1, 3, 16])
def test_every_text_gets_plain_encodes_vector(minilm, texts_per_call):
    texts = generate_texts(60, seed=2) + EDGE_TEXTS
    vectors = pipeline.encode(minilm.model, texts, texts_per_call)
    assert vectors.shape == (len(texts), 384) and vectors.dtype == np.float32
    assert cosines(vectors, plain(minilm.model, texts)).min() >= 0.999


def test_the_direct_tokenizer_gives_the_models_own_features(minilm):
    fast = tokenization.FastTokenizer.for_model(minilm.model)
    assert fast is not None
    texts = generate_texts(200, seed=7) + EDGE_TEXTS + ["word " * 400]  # past MiniLM's 256 tokens
    for batch in pipeline.plan_batches(texts, 32, minilm.model.max_seq_length):
        reference, mine = minilm.model.preprocess([texts[i] for i in batch]), fast([texts[i] for i in batch])
        assert set(mine) == set(reference)
        for key, value in reference.items():
            assert torch.equal(mine[key], value) if hasattr(value, "shape") else mine[key] == value


def test_the_vectors_are_the_same_with_one_or_several_tokenizer_threads(minilm):
    texts = generate_texts(120, seed=8) + EDGE_TEXTS
    one = pipeline.encode(minilm.model, texts, 8, tokenizer_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(pipeline.encode(minilm.model, texts, 8, tokenizer_threads=threads), one)
    assert encoder_threads() == []


def test_a_stream_of_items_gives_each_the_vectors_of_its_own_call(minilm):
    items = [generate_texts(n, seed=n) for n in (30, 1, 45)] + [EDGE_TEXTS]
    with EncodeStream(minilm.model, texts_per_call=16, tokenizer_threads=2) as stream:
        stream.feed(enumerate(items))
        results = list(stream.results())
    for result, texts in zip(results, items):
        np.testing.assert_array_equal(result.vectors, pipeline.encode(minilm.model, texts, 16, tokenizer_threads=1))


def test_the_service_streams_items_as_unit_vectors(minilm):
    items = [("first", generate_texts(20, seed=9)), ("second", generate_texts(5, seed=10))]
    results = list(minilm.encode_documents_streamed(iter(items)))
    assert [result.key for result in results] == ["first", "second"]
    for result, (_, texts) in zip(results, items):
        np.testing.assert_allclose(result.vectors, minilm.encode_documents(texts), atol=1e-6)


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
    assert threading.active_count() == threads and encoder_threads() == []


def test_a_model_the_direct_tokenizer_does_not_cover_is_tokenized_by_its_own_preprocess():
    with tokenization.Tokenization(FailingModel(), threads=4) as pool:
        assert pool.fast is None and pool.threads == 1 and pool.path == "model.preprocess, one thread"
        assert pool.submit(["good"]).result()["input_ids"].shape == (1, 4)


def test_fastest_texts_per_call_picks_one_of_those_it_measured(minilm):
    chosen, rates = pipeline.fastest_texts_per_call(minilm.model, generate_texts(16, seed=4), candidates=(4, 8), repeats=1)
    assert set(rates) == {4, 8} and chosen in rates and all(rate > 0 for rate in rates.values())
