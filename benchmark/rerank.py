"""The rerank suite: (query, document) pairs/s of the reranker at RERANK_TOP_K candidates.

It runs embeddings.reranker.Reranker with the configured RERANKER_MODEL and RERANK_BATCH_SIZE,
or with `--model-shape`, a randomly initialised cross-encoder of the matching shape. A model
that cannot be loaded here skips the suite, with the reason in the output.
"""
import time

from django.conf import settings

from benchmark.encoders import MEANINGLESS, RERANKER_SHAPES, quiet_transformers, reranker_loader
from benchmark.measure import per_second
from embeddings.encoder import ModelUnavailable

QUERY_WORDS = 8
QUERIES = {"cuda": 5}  # rerankings timed per device (each of RERANK_TOP_K pairs)
DEFAULT_QUERIES = 1


def make_reranker(model_shape):
    """(Reranker, how the output names its model)."""
    from embeddings.reranker import Reranker

    if model_shape:
        shape = RERANKER_SHAPES[model_shape]
        label = f"{shape.description} ({MEANINGLESS})"
        return Reranker(model_name=label, fallback_model=None, loader=reranker_loader(model_shape)), label
    return Reranker(), settings.RERANKER_MODEL


def candidates(texts, count):
    return (list(texts) * (count // len(texts) + 1))[:count]


def run(ctx):
    """Time the reranker over RERANK_TOP_K candidates per query; returns the suite's figures."""
    top_k = settings.RERANK_TOP_K
    reranker, label = make_reranker(ctx.options.model_shape)
    figures = {"model": label, "top_k": top_k, "batch_size": reranker.batch_size}
    ctx.progress(f"rerank: loading {label}")
    try:
        with quiet_transformers(reports=bool(ctx.options.model_shape)):
            device = reranker.model.device.type
    except ModelUnavailable as exc:
        return {**figures, "skipped": str(exc), "pairs_per_s": None}
    texts = ctx.texts().texts
    documents = candidates(texts, top_k)
    queries = [" ".join(text.split()[:QUERY_WORDS]) for text in texts[: QUERIES.get(device, DEFAULT_QUERIES)]]
    reranker.score(queries[0], documents[: reranker.batch_size])  # warm-up
    seconds = 0.0
    for query in queries:
        ctx.progress(f"rerank: {top_k} pairs")
        started = time.perf_counter()
        reranker.score(query, documents)
        seconds += time.perf_counter() - started
    pairs = top_k * len(queries)
    return {
        **figures,
        "device": device,
        "rerankings": len(queries),
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_s": per_second(pairs, seconds),
        "ms_per_query": seconds / len(queries) * 1000,
        "notes": reranker.notes,
    }
