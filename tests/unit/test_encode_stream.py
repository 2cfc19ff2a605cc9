"""The encode stream (embeddings/stream.py) with a model that costs nothing: each item's vectors come
back in the order submitted, in its texts' order; the model sees the batches `plan_batches` cuts; an
item that fails fails alone; a stream stopped midway leaves no thread behind."""
import threading

import numpy as np
import pytest
import torch

from embeddings.batches import plan_batches
from embeddings.encoder import encode_items
from embeddings.stream import EncodeStream, StreamStopped


class TextModel:
    """Stands for a SentenceTransformer: a text's vector is (its length, its first character's code).
    It records the batches it runs (by their first column: the texts' lengths) and fails on "boom"."""

    device = torch.device("cpu")
    max_seq_length = 512

    def __init__(self, gate=None):
        self.seen, self.gate = [], gate

    def eval(self):
        return self

    def get_embedding_dimension(self):
        return 2

    def preprocess(self, texts):
        rows = [[len(text), ord(text[0]) if text else 0, int(text == "boom")] for text in texts]
        return {"input_ids": torch.tensor(rows, dtype=torch.long), "modality": "text"}

    def __call__(self, features):
        if self.gate is not None:
            self.gate.wait()
        ids = features["input_ids"]
        if ids[:, 2].any():
            raise RuntimeError("the model failed on this batch")
        self.seen.append(ids[:, 0].tolist())
        return {"sentence_embedding": ids[:, :2].float()}


def expected(texts):
    return np.array([[len(text), ord(text[0]) if text else 0] for text in texts], dtype=np.float32).reshape(-1, 2)


def encoder_threads():
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("encode-")]


ITEMS = [["a" * n for n in (5, 40, 12)], [], ["bb", "c" * 300, "d"], ["e" * n for n in range(1, 30)]]


def test_each_item_comes_back_in_order_with_its_texts_vectors():
    with EncodeStream(TextModel(), texts_per_call=4) as stream:
        for number, texts in enumerate(ITEMS):
            stream.submit(texts, key=number)
        stream.close()
        results = list(stream.results())
    assert [result.key for result in results] == [0, 1, 2, 3]
    for result, texts in zip(results, ITEMS):
        assert result.error is None and result.vectors.dtype == np.float32
        np.testing.assert_array_equal(result.vectors, expected(texts))
    assert encoder_threads() == []


def test_the_model_sees_each_items_planned_batches_in_order():
    model = TextModel()
    with EncodeStream(model, texts_per_call=4) as stream:
        stream.feed(enumerate(ITEMS))
        list(stream.results())
    planned = [[len(texts[i]) for i in batch] for texts in ITEMS for batch in plan_batches(texts, 4, 512)]
    assert model.seen == planned  # longest first within an item, by count and token budget, items in order
    assert all(lengths == sorted(lengths, reverse=True) for lengths in model.seen)


def test_an_item_that_fails_fails_alone():
    items = [["fine"], ["boom", "with", "others"], ["after"]]
    results = list(encode_items_of(TextModel(), items))
    assert results[0].error is None and results[2].error is None
    assert isinstance(results[1].error, RuntimeError) and results[1].vectors is None
    np.testing.assert_array_equal(results[2].vectors, expected(["after"]))


def encode_items_of(model, items):
    with EncodeStream(model, texts_per_call=2) as stream:
        stream.feed(enumerate(items))
        yield from stream.results()


def test_an_error_from_the_items_is_raised_after_the_items_before_it():
    def items():
        yield "first", ["one", "two"]
        raise ValueError("the claim queue broke")

    with EncodeStream(TextModel(), texts_per_call=2) as stream:
        stream.feed(items())
        results = stream.results()
        assert next(results).key == "first"
        with pytest.raises(ValueError, match="claim queue broke"):
            next(results)


def test_a_stream_left_on_an_error_stops_and_leaves_no_thread():
    gate = threading.Event()
    stream = EncodeStream(TextModel(gate), texts_per_call=1)
    with pytest.raises(KeyboardInterrupt), stream:
        stream.submit(["x"] * 3, key="held")
        stream.submit(["y"], key="never run")
        gate.set()
        raise KeyboardInterrupt
    assert encoder_threads() == []
    results = list(stream.results())
    assert all(result.error is None or isinstance(result.error, StreamStopped) for result in results)
    with pytest.raises(RuntimeError):
        stream.submit(["z"])


def test_encode_items_gives_an_encoder_without_a_stream_the_same_results():
    class PlainEncoder:
        def encode_documents(self, texts):
            if "boom" in texts:
                raise RuntimeError("failed")
            return expected(texts)

    results = list(encode_items(PlainEncoder(), enumerate([["a", "bb"], ["boom"], []])))
    assert [result.key for result in results] == [0, 1, 2]
    np.testing.assert_array_equal(results[0].vectors, expected(["a", "bb"]))
    assert isinstance(results[1].error, RuntimeError) and results[2].vectors.shape == (0, 2)
