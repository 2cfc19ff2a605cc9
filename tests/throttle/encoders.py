"""An encoder of a given speed for the throttle's tests: the HashingEncoder, on a simulated device."""
import threading
import time

from embeddings.fakes import HashingEncoder


class RateEncoder(HashingEncoder):
    """HashingEncoder vectors, each call taking len(texts) / `texts_per_second` seconds; calls queue
    one after another, as on one device."""

    def __init__(self, texts_per_second, dimensions=384):
        super().__init__(dimensions)
        self.texts_per_second = float(texts_per_second)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def encode_documents(self, texts, texts_per_call=None):
        texts = list(texts)
        with self._lock:
            self._free_at = max(time.monotonic(), self._free_at) + len(texts) / self.texts_per_second
            done_at = self._free_at
        vectors = super().encode_documents(texts)
        delay = done_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return vectors
