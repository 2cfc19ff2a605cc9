"""The encode pipeline: texts to sentence vectors with a SentenceTransformer, keeping the device busy.

`SentenceTransformer.encode` runs each batch in turn: tokenize, copy to the device, forward pass,
copy the result back (a synchronisation). On a GPU the device idles while the CPU tokenizes and
while the result comes back. Here:

- texts are sorted by length and cut into batches by count and token budget (embeddings/batches.py),
  so that a batch of long texts is smaller than one of short texts;
- a pool of tokenizer threads prepares the next batches while the device runs the current one
  (embeddings/tokenization.py: the model's Rust tokenizer called directly, which releases the GIL,
  so that several threads tokenize at once; `model.preprocess` on one thread for models it does
  not cover); on CUDA their tensors are pinned, so that the copy to the device is asynchronous;
- the outputs stay on the device until the end of the call: one copy back, one synchronisation;
- the model's own modules run (`model(features)`), so the vectors are `encode`'s, to rounding.

`encode` is one item of an EncodeStream (embeddings/stream.py), which keeps the device fed across
many items (a backfill's claims). `fastest_texts_per_call` measures which number of texts per call
runs fastest on the model's device (the service does this once on CUDA; the benchmark's encode
suite sweeps the same candidates).
"""
import logging
import time

import numpy as np

from embeddings.batches import BUDGET_TOKENS_PER_TEXT, CHARS_PER_TOKEN, estimated_tokens, plan_batches
from embeddings.stream import EncodeStream, model_dimensions

__all__ = ["BUDGET_TOKENS_PER_TEXT", "CHARS_PER_TOKEN", "CUDA_TEXTS_PER_CALL_CANDIDATES", "encode",
           "estimated_tokens", "fastest_texts_per_call", "plan_batches"]

logger = logging.getLogger(__name__)

CUDA_TEXTS_PER_CALL_CANDIDATES = (64, 128, 256, 512, 1024)


def encode(model, texts, texts_per_call, tokenizer_threads=None):
    """float32 (n, dims) sentence vectors of `texts` (a list of str), in input order, not
    normalised (the model's own Normalize module, if any, has run). `tokenizer_threads`: the
    tokenizer pool's size (default: embeddings.tokenization.default_threads of the model's device)."""
    texts = list(texts)
    if not texts:
        return np.empty((0, model_dimensions(model)), dtype=np.float32)
    with EncodeStream(model, texts_per_call, tokenizer_threads) as stream:
        stream.submit(texts)
        stream.close()
        (result,) = stream.results()
    if result.error is not None:
        raise result.error
    return result.vectors


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
