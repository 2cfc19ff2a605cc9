"""Encoders for tests: the HashingEncoder with a recording, a delay, or poisoned texts."""
import threading
import time

import numpy as np

from embeddings.fakes import HashingEncoder

POISON_NAN = "POISON-NAN"
POISON_RAISE = "POISON-RAISE"


class RecordingEncoder(HashingEncoder):
    """Remembers every text it encoded (in call order), optionally sleeping per call."""

    def __init__(self, dimensions=384, delay=0.0):
        super().__init__(dimensions)
        self.delay = delay
        self.encoded = []
        self.calls = []
        self._lock = threading.Lock()

    def check_dimensions(self, column=None, column_dimensions=None):
        self.calls.append("check_dimensions")
        super().check_dimensions(column, column_dimensions)

    def encode_documents(self, texts, texts_per_call=None):
        texts = list(texts)
        with self._lock:
            self.calls.append("encode_documents")
            self.encoded.extend(texts)
        if self.delay:
            time.sleep(self.delay)
        return super().encode_documents(texts)


class PoisonedEncoder(RecordingEncoder):
    """NaN for texts containing POISON_NAN; raises for a batch holding a POISON_RAISE text."""

    def encode_documents(self, texts, texts_per_call=None):
        texts = list(texts)
        if any(POISON_RAISE in text for text in texts):
            raise ValueError("tokenizer exploded")
        vectors = super().encode_documents(texts)
        for i, text in enumerate(texts):
            if POISON_NAN in text:
                vectors[i] = np.nan
        return vectors


class BrokenEncoder(RecordingEncoder):
    """Fails on every text, as a model on a broken device would."""

    def encode_documents(self, texts, texts_per_call=None):
        super().encode_documents(texts)
        raise RuntimeError("device lost")
