"""The reranker: a cross-encoder that re-scores the search's nearest candidates.

- `RERANKER_MODEL` (default BAAI/bge-reranker-base) is a Hugging Face id or a local directory.
  `BAAI/bge-reranker-large` is more accurate and needs about three times the memory: when a
  model cannot be loaded for lack of memory, `FALLBACK_MODEL` is loaded instead, and the
  reranker says so in `notes` (the search passes them on to the caller: never silently).
- A model that cannot be found offline is a RerankerUnavailable error naming the fix.
- Loading is lazy (first use) and thread-safe; one reranker per model and device per process.
- Each (query, document) pair is capped at `MAX_LENGTH` tokens (the bge rerankers' 512): the
  tokenizer truncates the longer of the two. Pairs are scored in batches of RERANK_BATCH_SIZE.
"""
import logging
import threading
from dataclasses import dataclass

from django.conf import settings

from embeddings.encoder import LazyModel, ModelUnavailable, check_loadable, resolve_device

logger = logging.getLogger(__name__)

FALLBACK_MODEL = "BAAI/bge-reranker-base"
MAX_LENGTH = 512

_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


class RerankerUnavailable(ModelUnavailable):
    """The configured reranker (and its fallback, where one applies) cannot be loaded here."""


@dataclass(frozen=True)
class Reranked:
    """One document of a reranked list: its position in the input and its score (higher is better)."""

    index: int
    score: float


def is_out_of_memory(exc):
    """True when `exc` says a model did not fit in CPU or GPU memory."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in _MEMORY_WORDS)


def load_cross_encoder(model_name, *, device, max_length):
    """A sentence-transformers CrossEncoder for `model_name`, or RerankerUnavailable naming the fix."""
    from sentence_transformers import CrossEncoder

    try:
        check_loadable(model_name)
    except ModelUnavailable:
        raise RerankerUnavailable(
            f"RERANKER_MODEL={model_name!r} is not a local directory, not in the Hugging Face cache, "
            "and the hub cannot be reached from here. Connect to the internet once to download it, "
            "set RERANKER_MODEL to a directory holding a cross-encoder, or set ENABLE_RERANKER=false."
        ) from None
    try:
        model = CrossEncoder(model_name, device=device, max_length=max_length, num_labels=1)
    except (OSError, ValueError) as exc:
        raise RerankerUnavailable(f"RERANKER_MODEL={model_name!r} could not be loaded: {exc}") from exc
    if device == "cuda":
        model.half()
    model.eval()
    return model


class Reranker(LazyModel):
    """Scores (query, document) pairs with a cross-encoder. Thread-safe; loads on first use.

    `loader(model_name, device=..., max_length=...)` builds the model (load_cross_encoder by
    default); `notes` lists what the caller must be told about the model actually used.
    """

    def __init__(self, model_name=None, *, fallback_model=FALLBACK_MODEL, device=None, batch_size=None,
                 max_length=MAX_LENGTH, loader=load_cross_encoder):
        self.model_name = model_name or settings.RERANKER_MODEL
        self.fallback_model = fallback_model
        self.requested_device = device or settings.EMBEDDING_DEVICE
        self.batch_size = batch_size or settings.RERANK_BATCH_SIZE
        self.max_length = max_length
        self.loader = loader
        self.loaded_model_name = None
        self.notes = []
        super().__init__()

    def _load(self):
        device = resolve_device(self.requested_device)
        try:
            model = self.loader(self.model_name, device=device, max_length=self.max_length)
            self.loaded_model_name = self.model_name
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or not self.fallback_model or self.fallback_model == self.model_name:
                raise
            model = self._load_fallback(exc, device)
        logger.info("loaded reranker %s on %s", self.loaded_model_name, device)
        return model

    def _load_fallback(self, exc, device):
        """The fallback model, after `self.model_name` ran out of memory (`exc`); noted for the caller."""
        self._free_cuda_cache()
        reason = str(exc) or type(exc).__name__
        try:
            model = self.loader(self.fallback_model, device=device, max_length=self.max_length)
        except ModelUnavailable as fallback_exc:
            raise RerankerUnavailable(
                f"Reranker {self.model_name} could not be loaded for lack of memory ({reason}), and "
                f"neither could its fallback: {fallback_exc}"
            ) from fallback_exc
        note = (f"Reranker {self.model_name} could not be loaded for lack of memory ({reason}); "
                f"fell back to {self.fallback_model}.")
        logger.warning(note)
        self.loaded_model_name = self.fallback_model
        self.notes.append(note)
        return model

    @staticmethod
    def _free_cuda_cache():
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def score(self, query, documents):
        """Scores of (query, document) for each document, in input order (floats)."""
        documents = list(documents)
        if not documents:
            return []
        scores = self.model.predict(
            [(query, document) for document in documents],
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return [float(score) for score in scores]

    def rerank(self, query, documents, top_k=None):
        """The `top_k` (default RETURN_TOP_K) best documents as Reranked items, best first.

        Ties keep the input order, so the base ranking breaks them.
        """
        top_k = settings.RETURN_TOP_K if top_k is None else top_k
        scores = self.score(query, documents)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [Reranked(i, scores[i]) for i in order[:top_k]]


_rerankers = {}
_rerankers_lock = threading.Lock()


def get_reranker():
    """The process's Reranker for the configured model (one per model and device)."""
    key = (settings.RERANKER_MODEL, settings.EMBEDDING_DEVICE)
    with _rerankers_lock:
        if key not in _rerankers:
            _rerankers[key] = Reranker()
        return _rerankers[key]
