"""The encode pipeline as a stream: items of texts in as they come, each item's vectors out in order,
the device fed across the items' boundaries.

A backfill embeds its rows claim by claim (1,000 rows each by default). Encoding each claim in a
call of its own leaves the device idle at every boundary: the call starts, waits for its first
batch to be tokenized, and at its end waits for the device before the next call begins (a claim's
call ran at 0.48-0.49 of one large call's rate on an H200). An EncodeStream is one pipeline for all
of them:

- `submit(texts, key)` cuts the item's texts into batches (embeddings/batches.py: longest first, by
  count and token budget) and queues them; it waits while MAX_PENDING items are not yet handed back;
- the tokenizer threads (embeddings/tokenization.py) tokenize the batches in order, across items,
  ahead of the device;
- one device thread runs the model over every batch in order. When an item's last batch is queued,
  its vectors start their copy back (into pinned memory, asynchronously, on CUDA) and the thread
  goes on with the next item's batches: no synchronisation between items;
- `results()` yields an `Encoded(key, vectors, error)` per item in the order submitted, waiting only
  for that item's copy. An item whose tokenization or forward pass raised comes back with its error
  (vectors None), and the stream goes on with the next one.

`close()` says that no more items will come: `results()` ends after the last. `feed(items)` submits
from a thread of its own (for items read from a queue) and closes. Leaving the `with` block on an
exception stops the stream: the items not finished come back with an error, the threads end.
The vectors are the model's output in float32, in input order, not normalised: the same as
`pipeline.encode` of the same texts.
"""
import contextlib
import queue
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from embeddings.batches import plan_batches
from embeddings.tokenization import Tokenization, default_threads

MAX_PENDING = 4  # items submitted and not yet handed back by results(): submit() waits beyond this
POLL_S = 0.1  # how often a waiting thread looks whether the stream was stopped
_END = object()


class StreamStopped(RuntimeError):
    """The stream stopped before this item was encoded."""


@dataclass
class Encoded:
    """An item's vectors (float32, one row per text, in its order), or the error that stopped it."""

    key: object
    vectors: object = None
    error: BaseException = None


def model_dimensions(model):
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return dimension()


class _Item:
    """A submitted item on its way: its batches, the device's outputs, then its vectors on the host."""

    def __init__(self, key, texts, batches):
        self.key, self.texts, self.batches = key, texts, batches
        self.remaining = len(batches)
        self.outputs, self.positions = [], []
        self.error = None
        self.host = self.copied = None  # the vectors on the host; the CUDA event of their copy
        self.finished = threading.Event()

    def fail(self, error):
        if not self.finished.is_set():
            self.error = self.error or error
            self.outputs = []
            self.finished.set()

    def encoded(self, dimensions):
        """Its Encoded; `dimensions()` gives the width of an item without texts."""
        if self.error is not None:
            return Encoded(self.key, error=self.error)
        if not self.texts:
            return Encoded(self.key, np.empty((0, dimensions()), dtype=np.float32))
        if self.copied is not None:
            self.copied.synchronize()
        vectors = self.host.numpy()
        ordered = np.empty_like(vectors)
        ordered[np.asarray(self.positions)] = vectors
        return Encoded(self.key, ordered)


class EncodeStream:
    """Items of texts in (`submit`, from one thread), each item's vectors out in order (`results`)."""

    def __init__(self, model, texts_per_call, tokenizer_threads=None, lock=None, max_pending=MAX_PENDING):
        self.model, self.texts_per_call = model, texts_per_call
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        threads = default_threads(self.device) if tokenizer_threads is None else tokenizer_threads
        self.tokenization = Tokenization(model, threads, pin=self.cuda)
        self._lock = lock if lock is not None else contextlib.nullcontext()  # held around each forward pass
        self._room = threading.Semaphore(max_pending)
        self._incoming, self._order = queue.Queue(), queue.Queue()  # to the device thread; to results()
        self._stopped, self._closed, self._ended = threading.Event(), False, False
        self._window, self._current = deque(), None  # (item, indices, Future) tokenizing; (item, its batches)
        self._feeder, self._feed_error, self._dims = None, None, None
        model.eval()
        self._thread = threading.Thread(target=self._run, name="encode-device", daemon=True)
        self._thread.start()

    # --- the caller's side ---------------------------------------------------------------------

    def submit(self, texts, key=None):
        """Queue `texts` (a list of str) as one item; waits while MAX_PENDING items are pending."""
        if self._closed:
            raise RuntimeError("submit() after close(): start another EncodeStream")
        if self._stopped.is_set():
            raise StreamStopped("the stream was stopped: start another EncodeStream")
        while not self._room.acquire(timeout=POLL_S):
            if self._stopped.is_set():
                raise StreamStopped("the stream was stopped")
        texts = list(texts)
        item = _Item(key, texts, plan_batches(texts, self.texts_per_call, self.model.max_seq_length or 512))
        self._order.put(item)
        if not item.batches:
            item.finished.set()
        elif self._stopped.is_set():
            item.fail(StreamStopped("the stream was stopped"))
        else:
            self._incoming.put(item)

    def close(self):
        """No more items: results() ends after the last one submitted."""
        if not self._closed:
            self._closed = True
            self._incoming.put(_END)
            self._order.put(_END)

    def feed(self, items):
        """Submit each (key, texts) of the iterable `items` from a thread of its own, then close.
        An error raised by `items` is raised by results() after the items before it."""
        def run():
            try:
                for key, texts in items:
                    self.submit(texts, key)
            except BaseException as exc:  # handed to the reader of results()
                self._feed_error = exc
            finally:
                self.close()

        self._feeder = threading.Thread(target=run, name="encode-feed", daemon=True)
        self._feeder.start()

    def results(self):
        """Yield each item's Encoded in the order submitted, until close() and the last item."""
        while True:
            item = self._next_in_order()
            if item is _END:
                break
            try:
                while not item.finished.wait(POLL_S):
                    if not self._thread.is_alive():
                        item.fail(StreamStopped("the stream's device thread ended"))
                yield item.encoded(self.dimensions)
            finally:
                self._room.release()
        if self._feed_error is not None:
            raise self._feed_error

    def _next_in_order(self):
        while True:
            try:
                return self._order.get(timeout=POLL_S)
            except queue.Empty:
                if self._stopped.is_set() and not self._thread.is_alive():
                    return _END

    def dimensions(self):
        if self._dims is None:
            self._dims = model_dimensions(self.model)
        return self._dims

    def stop(self):
        """Stop now: the batch in hand finishes, the items not finished get a StreamStopped error."""
        self._stopped.set()
        self._shut_down()

    def _shut_down(self):
        self._thread.join()
        self.tokenization.close()
        if self._feeder is not None:
            self._feeder.join(timeout=5 * POLL_S)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is not None:
            self.stop()
        else:
            self.close()
            self._shut_down()

    # --- the device thread ----------------------------------------------------------------------

    def _run(self):
        import torch

        error = None
        try:
            on_device = torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()
            with torch.inference_mode(), on_device:
                while not self._stopped.is_set():
                    self._fill(block=not self._window)
                    if not self._window:
                        break  # closed, and every batch run
                    item, indices, future = self._window.popleft()
                    self._fill(block=False)  # the tokenizer threads stay busy while the device works
                    self._step(item, indices, future)
        except BaseException as exc:  # every item not finished gets it
            error = exc
        finally:
            self._stopped.set()
            self._fail_remaining(error or StreamStopped("the stream stopped before this item was encoded"))

    def _fill(self, block):
        """Submit batches for tokenization until `tokenization.ahead` are in the window; waits for an
        item only when `block` and the window is empty."""
        while len(self._window) < self.tokenization.ahead:
            batch = self._next_batch(block and not self._window)
            if batch is None:
                return
            item, indices = batch
            self._window.append((item, indices, self.tokenization.submit([item.texts[i] for i in indices])))

    def _next_batch(self, block):
        """(item, indices) of the next batch in order, or None (none yet, or none ever: closed)."""
        while True:
            if self._current is not None:
                indices = next(self._current[1], None)
                if indices is not None:
                    return self._current[0], indices
                self._current = None
            if self._ended:
                return None
            try:
                item = self._incoming.get(timeout=POLL_S) if block else self._incoming.get_nowait()
            except queue.Empty:
                if block and not self._stopped.is_set():
                    continue
                return None
            if item is _END:
                self._ended = True
                return None
            self._current = (item, iter(item.batches))

    def _step(self, item, indices, future):
        """Run one batch of `item`; finish the item after its last batch."""
        if item.error is None:
            try:
                features = future.result()
                with self._lock:
                    self._forward(item, indices, features)
            except Exception as exc:  # this item fails; the stream goes on
                item.error, item.outputs = exc, []
                _free_cuda_cache(exc)
        else:
            future.cancel()
        item.remaining -= 1
        if item.remaining == 0:
            self._finish(item)

    def _forward(self, item, indices, features):
        features = {key: value.to(self.device, non_blocking=self.cuda) if hasattr(value, "to") else value
                    for key, value in features.items()}
        item.outputs.append(self.model(features)["sentence_embedding"])
        item.positions.extend(indices)

    def _finish(self, item):
        """The item's vectors on their way to the host: on CUDA an asynchronous copy and an event."""
        import torch

        try:
            if item.error is None:
                vectors = torch.cat(item.outputs).float()
                if self.cuda:
                    item.host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
                    item.host.copy_(vectors, non_blocking=True)
                    item.copied = torch.cuda.Event()
                    item.copied.record()
                else:
                    item.host = vectors
        except Exception as exc:
            item.error = exc
            _free_cuda_cache(exc)
        item.outputs = []
        item.finished.set()

    def _fail_remaining(self, error):
        for item, _, future in self._window:
            future.cancel()
            item.fail(error)
        self._window.clear()
        if self._current is not None:
            self._current[0].fail(error)
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if item is not _END:
                item.fail(error)


def _free_cuda_cache(exc):
    """After a CUDA out-of-memory error, give the cached blocks back, so that the next item can run."""
    if "out of memory" in str(exc):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
