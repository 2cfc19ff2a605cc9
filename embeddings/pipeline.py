"""The encode pipeline: texts to sentence vectors with a SentenceTransformer, keeping the device busy.

`SentenceTransformer.encode` runs each batch in turn: tokenize, copy to the device, forward pass,
copy the result back (a synchronisation). On a GPU the device idles while the CPU tokenizes and
while the result comes back. Here:

- texts are sorted by length (characters, longest first, as `encode` does) and cut into batches
  of at most `texts_per_call` texts and at most a token budget (`texts_per_call` x BUDGET_TOKENS_PER_TEXT,
  estimated from characters), so that a batch of long texts is smaller than one of short texts;
- a tokenizer thread prepares the next batches (`model.preprocess`, the same tokenization as
  `encode`) while the device runs the current one; on CUDA their tensors are pinned, so that the
  copy to the device is asynchronous (`non_blocking`);
- the outputs stay on the device until the end of the call: one copy back, one synchronisation;
- the model's own modules run (`model(features)`), so the vectors are `encode`'s, to rounding.

`fastest_texts_per_call` measures which number of texts per call runs fastest on the model's device
(the service does this once on CUDA; the benchmark's encode suite sweeps the same candidates).
"""
import logging
import queue
import threading
import time

import numpy as np

logger = logging.getLogger(__name__)

PREFETCH = 2  # batches tokenized ahead of the device
BUDGET_TOKENS_PER_TEXT = 128  # the token budget of a batch: texts_per_call texts of this many tokens
CHARS_PER_TOKEN = 3  # English WordPiece runs ~4 characters a token: this over-estimates a little
CUDA_TEXTS_PER_CALL_CANDIDATES = (64, 128, 256, 512, 1024)
_DONE = object()


def estimated_tokens(text, max_length):
    """An upper estimate of the tokens `text` becomes, special tokens included."""
    return min(max_length, len(text) // CHARS_PER_TOKEN + 2)


def plan_batches(texts, texts_per_call, max_length, budget_tokens_per_text=BUDGET_TOKENS_PER_TEXT):
    """Lists of indices into `texts`: longest texts first, each batch at most `texts_per_call` texts
    and, padded to its longest text, at most `texts_per_call * budget_tokens_per_text` tokens."""
    budget = texts_per_call * budget_tokens_per_text
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches, current, longest = [], [], 0
    for index in order:
        tokens = estimated_tokens(texts[index], max_length)
        width = max(longest, tokens)
        if current and (len(current) == texts_per_call or width * (len(current) + 1) > budget):
            batches.append(current)
            current, width = [], tokens
        current.append(index)
        longest = width
    if current:
        batches.append(current)
    return batches


def _dimensions(model):
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return dimension()


def _preprocess(model, texts):
    """The model's tokenization of `texts`, as `encode` does it (sentence-transformers 5 and 6)."""
    if hasattr(model, "preprocess"):
        return model.preprocess(texts)
    return model.tokenize(texts)


class _Tokenizer(threading.Thread):
    """Tokenizes the batches in order into a short queue, ahead of the device."""

    def __init__(self, model, texts, batches, pin):
        super().__init__(name="encode-tokenizer", daemon=True)
        self.model, self.texts, self.batches, self.pin = model, texts, batches, pin
        self.ready = queue.Queue(PREFETCH)
        self.stopped = threading.Event()

    def run(self):
        try:
            for batch in self.batches:
                features = _preprocess(self.model, [self.texts[i] for i in batch])
                if self.pin:
                    features = {key: value.pin_memory() if hasattr(value, "pin_memory") else value
                                for key, value in features.items()}
                if not self._put((batch, features)):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the encoding thread, which raises it
            self._put(exc)

    def _put(self, item):
        while not self.stopped.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def batches_ready(self):
        """Yield (indices, features) until the end; raise what the thread raised."""
        while True:
            item = self.ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def encode(model, texts, texts_per_call):
    """float32 (n, dims) sentence vectors of `texts` (a list of str), in input order, not
    normalised (the model's own Normalize module, if any, has run)."""
    import torch

    texts = list(texts)
    if not texts:
        return np.empty((0, _dimensions(model)), dtype=np.float32)
    device = model.device
    cuda = device.type == "cuda"
    batches = plan_batches(texts, texts_per_call, model.max_seq_length or 512)
    tokenizer = _Tokenizer(model, texts, batches, pin=cuda)
    outputs, positions = [], []
    model.eval()
    tokenizer.start()
    try:
        with torch.inference_mode():
            for batch, features in tokenizer.batches_ready():
                features = {key: value.to(device, non_blocking=cuda) if hasattr(value, "to") else value
                            for key, value in features.items()}
                outputs.append(model(features)["sentence_embedding"])
                positions.extend(batch)
            vectors = torch.cat(outputs).float().cpu().numpy()  # the one synchronisation
    finally:
        tokenizer.stopped.set()
        tokenizer.join()
    ordered = np.empty_like(vectors)
    ordered[np.asarray(positions)] = vectors
    return ordered


def fastest_texts_per_call(model, texts, candidates=CUDA_TEXTS_PER_CALL_CANDIDATES, repeats=2):
    """(the texts per call that encode `texts` fastest on the model's device, {texts per call: texts/s})."""
    import torch

    cuda = model.device.type == "cuda"
    encode(model, texts[: min(candidates)], min(candidates))  # warm-up: kernels, allocator
    rates = {}
    for size in sorted(candidates):
        best = float("inf")
        try:
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(model.device)
                started = time.perf_counter()
                encode(model, texts, size)
                best = min(best, time.perf_counter() - started)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break  # larger sizes would not fit either
        rates[size] = len(texts) / best
    if not rates:
        return min(candidates), rates
    chosen = max(rates, key=rates.get)
    logger.info("encode texts per call on %s: %s texts/s; chose %d", model.device,
                ", ".join(f"{size}: {rate:,.0f}" for size, rate in rates.items()), chosen)
    return chosen, rates
