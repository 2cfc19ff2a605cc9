"""Tokenization for the encode pipeline: the model's own Rust tokenizer, called directly, in a pool of threads.

`model.preprocess` (sentence-transformers) tokenizes through transformers' Python layer, which holds
the GIL for most of its time (lists, padding, tensors): two threads calling it run little faster
than one, and one thread of it is what limited the pipeline on a GPU. Here:

- `FastTokenizer.for_model(model)` copies the model's Rust tokenizer (`tokenizers.Tokenizer`, with
  the model's truncation) and builds the features with numpy. The Rust call releases the GIL, so
  threads tokenize in parallel. It is used only where its features equal `model.preprocess`'s,
  tensor for tensor, on a set of probe texts (plain text models with a fast tokenizer: BERT, bge,
  MiniLM); any other model is tokenized by `model.preprocess`, on one thread.
- `Tokenization(model, threads, pin)` is a pool of threads, started once and used for every batch
  of an encode call or stream: `submit(texts)` returns a Future of one batch's features, pinned on
  CUDA. Each thread tokenizes on one core: the Rust tokenizer's own parallelism over a batch's texts
  is switched off (TOKENIZERS_PARALLELISM=false, unless the environment sets it).
- `default_threads(device)`: one on a CPU (the model needs the cores), up to 8 on CUDA.
"""
import itertools
import logging
import os
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

logger = logging.getLogger(__name__)

MAX_CUDA_THREADS = 8
PREFETCH = 2  # batches submitted beyond one per thread
FEATURE_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Texts whose features must be the same through both paths before the direct one is used.
PROBE_TEXTS = ("", "   ", "A short sentence.", "  Spaces before and after  ", "MiXeD CaSe, Ärzte über Café",
               "אכילת בשר בלבד", "肉食 と 健康", "🥩 " * 40, "word " * 700,
               "[PAD] [CLS] [SEP] [MASK] [UNK]", "tabs\tand\nnewlines")

_fast = weakref.WeakKeyDictionary()  # model -> (max_seq_length, FastTokenizer or None)
_preprocess_locks = weakref.WeakKeyDictionary()  # model -> its tokenizer's lock (transformers' is not thread-safe)
_registry_lock = threading.Lock()


def usable_cpus():
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def default_threads(device):
    """Tokenizer threads for a model on `device`: 1 off CUDA, else half the CPUs, at most 8."""
    if not str(device).startswith("cuda"):
        return 1
    return max(1, min(MAX_CUDA_THREADS, usable_cpus() // 2))


def one_core_a_thread():
    """Each Rust tokenizer call runs on its calling thread (the pool is the parallelism), unless
    TOKENIZERS_PARALLELISM is set. Read by the tokenizers library at every call."""
    with _registry_lock:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def preprocess(model, texts):
    """The model's own tokenization of `texts`, as `encode` does it (sentence-transformers 5 and 6)."""
    with _registry_lock:
        lock = _preprocess_locks.setdefault(model, threading.Lock())
    with lock:
        if hasattr(model, "preprocess"):
            return model.preprocess(texts)
        return model.tokenize(texts)


class FastTokenizer:
    """`model.preprocess`'s features for a list of texts, from a copy of the model's Rust tokenizer."""

    def __init__(self, rust, pad_id, pad_left, names, extras):
        self.rust, self.pad_id, self.pad_left = rust, pad_id, pad_left
        self.names, self.extras = names, extras  # the tensors to build; values such as modality="text"
        self._encode = getattr(rust, "encode_batch_fast", rust.encode_batch)  # "fast": no character offsets

    @classmethod
    def for_model(cls, model):
        """The model's FastTokenizer, or None where its features would differ from `model.preprocess`'s."""
        length = getattr(model, "max_seq_length", None)
        with _registry_lock:
            cached = _fast.get(model)
        if cached is None or cached[0] != length:
            cached = (length, cls._checked(model, length))
            with _registry_lock:
                _fast[model] = cached
        return cached[1]

    @classmethod
    def _checked(cls, model, length):
        try:
            fast = cls._built(model, length)
            if fast is not None and fast.matches(preprocess(model, list(PROBE_TEXTS))):
                return fast
        except Exception as exc:  # a tokenizer this does not know: the model's own path
            logger.debug("the direct tokenizer does not fit %s: %s", type(model).__name__, exc)
        logger.info("tokenizing with model.preprocess on one thread: the model's features are not the direct "
                    "tokenizer's")
        return None

    @classmethod
    def _built(cls, model, length):
        from tokenizers import Tokenizer

        wrapper = getattr(model, "tokenizer", None)
        rust = getattr(wrapper, "_tokenizer", None)  # transformers' fast tokenizers keep theirs here
        if not isinstance(rust, Tokenizer) or not length or wrapper.pad_token_id is None:
            return None
        copy = Tokenizer.from_str(rust.to_str())
        copy.no_padding()
        copy.enable_truncation(length, strategy="longest_first", direction=wrapper.truncation_side)
        probe = preprocess(model, ["a"])
        names = tuple(name for name in FEATURE_NAMES if name in probe)
        extras = {key: value for key, value in probe.items() if not hasattr(value, "shape")}
        if set(probe) != set(names) | set(extras) or "input_ids" not in names:
            return None  # features this does not build (prompt lengths, position ids, images)
        return cls(copy, wrapper.pad_token_id, wrapper.padding_side == "left", names, extras)

    def matches(self, reference):
        """Whether this gives `reference` (the model's features of PROBE_TEXTS), value for value."""
        mine = self(list(PROBE_TEXTS))
        return set(mine) == set(reference) and all(_same(value, mine[key]) for key, value in reference.items())

    def __call__(self, texts):
        import torch

        rows = [encoding.ids for encoding in self._encode(texts)]  # the GIL is released while it tokenizes
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        width = int(lengths.max())
        positions = np.arange(width)
        mask = positions >= (width - lengths)[:, None] if self.pad_left else positions < lengths[:, None]
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        built = {"input_ids": ids, "attention_mask": mask.astype(np.int64),
                 "token_type_ids": np.zeros_like(ids)}
        return {**{name: torch.from_numpy(built[name]) for name in self.names}, **self.extras}


def _same(value, other):
    """Tensors of one dtype, shape and values; other values equal."""
    if not hasattr(value, "shape"):
        return value == other
    return value.dtype == other.dtype and value.shape == other.shape and bool((value == other).all())


def pinned(features):
    return {key: value.pin_memory() if hasattr(value, "pin_memory") else value for key, value in features.items()}


class Tokenization:
    """A pool of tokenizer threads for one model, started once, reused for every batch until `close()`."""

    def __init__(self, model, threads=1, pin=False):
        self.fast = FastTokenizer.for_model(model)
        self.threads = max(1, threads) if self.fast is not None else 1
        self._tokenize = self.fast if self.fast is not None else (lambda texts: preprocess(model, texts))
        self.pin = pin
        if self.threads > 1:
            one_core_a_thread()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="encode-tokenizer")

    @property
    def path(self):
        if self.fast is None:
            return "model.preprocess, one thread"
        return f"the model's Rust tokenizer, {self.threads} thread{'s' if self.threads > 1 else ''}"

    @property
    def ahead(self):
        """Batches to keep submitted so that every thread has work."""
        return self.threads + PREFETCH

    def _features(self, texts):
        features = self._tokenize(texts)
        return pinned(features) if self.pin else features

    def submit(self, texts):
        """A Future of the features of `texts` (one batch)."""
        return self._pool.submit(self._features, texts)

    def close(self):
        """Stop the threads: batches not started are dropped, the one in hand finishes."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tokenize_batches(tokenization, texts, batches):
    """[(indices, features)] of every batch, in order, `tokenization.ahead` batches submitted at a time."""
    pending, remaining, done = deque(), iter(batches), []
    for batch in itertools.islice(remaining, tokenization.ahead):
        pending.append((batch, tokenization.submit([texts[i] for i in batch])))
    while pending:
        batch, future = pending.popleft()
        done.append((batch, future.result()))
        following = next(remaining, None)
        if following is not None:
            pending.append((following, tokenization.submit([texts[i] for i in following])))
    return done
