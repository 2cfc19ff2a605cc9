"""The encode suite: texts/s and tokens/s of the embedding service for a sweep of texts per call.

Each configuration encodes the same texts through `EmbeddingsService.encode_documents` (the
encode pipeline of embeddings/pipeline.py, the path the backfill uses), on the configured device:
fp32 on the CPU, fp16 and fp32 on CUDA. Side by side, at each number of texts per call, the service's former
path: one `SentenceTransformer.encode(texts, batch_size=N)` call. The baseline is the plain
`SentenceTransformer.encode(texts)` call (its default of 32 texts per call, fp32) on the same texts
and the same model object, timed once before and once after the sweep; the pipeline's vectors
are compared with it text by text (cosine). Every figure is the best of REPEATS runs, the two
paths alternating: on a shared machine, other work only ever slows a run down, so the fastest
run is the truest.

On CUDA the service chooses its texts per call by measuring 64-1024 on the device
(EmbeddingsService.measure_texts_per_call); the suite reports the number it chose and the sweep.
"""
import contextlib

import numpy as np

from benchmark.measure import per_second, timed
from embeddings.pipeline import CUDA_TEXTS_PER_CALL_CANDIDATES

REPEATS = 3
CPU_TEXTS_PER_CALL_CANDIDATES = (16, 32, 64)
BASELINE_TEXTS_PER_CALL = 32  # SentenceTransformer.encode()'s default batch_size
MIN_COSINE = 0.999  # the pipeline's vectors against plain encode()'s, text by text (fp32)
# The target for an H100-class GPU with the bge-small shape.
GPU_TARGET_TEXTS_PER_S = 10_000


def default_texts_per_call(device):
    return CUDA_TEXTS_PER_CALL_CANDIDATES if device == "cuda" else CPU_TEXTS_PER_CALL_CANDIDATES


def dtypes_for(device):
    return ("fp16", "fp32") if device == "cuda" else ("fp32",)


def count_tokens(model, texts):
    """Tokens the model sees for `texts` (special tokens included, truncated as it truncates)."""
    encoded = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)
    return sum(len(ids) for ids in encoded["input_ids"])


@contextlib.contextmanager
def model_dtype(model, dtype):
    """Run the block with `model` in `dtype` ("fp16" or "fp32"); its own dtype is restored after."""
    import torch

    wanted = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    original = next(model.parameters()).dtype
    model.to(wanted)
    try:
        yield
    finally:
        model.to(original)


def best_of(call, device, repeats=REPEATS):
    """(fastest seconds, highest peak memory) of `repeats` timed runs of `call()`."""
    runs = [timed(call, device) for _ in range(repeats)]
    return min(seconds for seconds, _ in runs), max(memory for _, memory in runs)


def _baseline(model, texts, device):
    with model_dtype(model, "fp32"):
        return timed(lambda: model.encode(texts, show_progress_bar=False), device)


def st_encode(model, texts, texts_per_call):
    """The service's former path: one SentenceTransformer.encode() call, normalised."""
    return model.encode(texts, batch_size=texts_per_call, convert_to_numpy=True, normalize_embeddings=True,
                        show_progress_bar=False)


def min_cosine(vectors, reference):
    """The smallest cosine between matching rows of two arrays of vectors."""
    vectors = np.asarray(vectors, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    dots = np.sum(vectors * reference, axis=1)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return float(np.min(dots / norms))


def _alternating(first, second, device):
    """(best seconds and peak memory of `first`, best seconds of `second`), alternating REPEATS times."""
    firsts, seconds = [], []
    for _ in range(REPEATS):
        firsts.append(timed(first, device))
        seconds.append(timed(second, device)[0])
    return min(run[0] for run in firsts), max(run[1] for run in firsts), min(seconds)


def _sweep(service, texts, tokens, candidates, device, progress, plain):
    runs = []
    for dtype in dtypes_for(device):
        with model_dtype(service.model, dtype):
            service.encode_documents(texts[: max(candidates)], texts_per_call=max(candidates))  # warm-up
            st_encode(service.model, texts[: max(candidates)], max(candidates))
            for texts_per_call in candidates:
                progress(f"encode: {dtype}, {texts_per_call} texts per call: the pipeline and "
                         "SentenceTransformer.encode()")
                vectors = service.encode_documents(texts, texts_per_call=texts_per_call)
                seconds, memory, former = _alternating(
                    lambda: service.encode_documents(texts, texts_per_call=texts_per_call),
                    lambda: st_encode(service.model, texts, texts_per_call), device)
                runs.append({
                    "dtype": dtype, "texts_per_call": texts_per_call, "seconds": seconds,
                    "texts_per_s": per_second(len(texts), seconds),
                    "tokens_per_s": per_second(tokens, seconds),
                    "peak_memory_mb": memory,
                    "st_encode_texts_per_s": per_second(len(texts), former),
                    "ratio_to_st_encode": former / seconds,
                    "min_cosine_to_plain": min_cosine(vectors, plain),
                })
    return runs


def _chosen_texts_per_call(service, texts, device):
    """On CUDA, the texts per call the service measures and keeps (and its measurements), else None."""
    if device != "cuda":
        return None
    chosen = service.measure_texts_per_call(texts)
    return {"texts_per_call": chosen, "texts_per_s": service.measured_texts_per_call,
            "how": "EmbeddingsService.measure_texts_per_call: the fastest of these on this device, fp16"}


def run(ctx):
    """Measure the service against plain encode(); returns the suite's figures."""
    service, device = ctx.service, ctx.device
    sample = ctx.texts()
    texts = sample.texts
    candidates = ctx.options.texts_per_call or default_texts_per_call(device)
    tokens = count_tokens(service.model, texts)

    ctx.progress("encode: warming up, then plain SentenceTransformer.encode() as the baseline")
    with model_dtype(service.model, "fp32"):
        service.model.encode(texts[:BASELINE_TEXTS_PER_CALL], show_progress_bar=False)
        plain = service.model.encode(texts, show_progress_bar=False, normalize_embeddings=True)
    before, memory_before = _baseline(service.model, texts, device)
    runs = _sweep(service, texts, tokens, candidates, device, ctx.progress, plain)
    ctx.progress("encode: the baseline again")
    after, memory_after = _baseline(service.model, texts, device)

    baseline = per_second(len(texts), min(before, after))
    for entry in runs:
        entry["ratio_to_baseline"] = entry["texts_per_s"] / baseline
    best = max(runs, key=lambda entry: entry["texts_per_s"])
    best_former = max(entry["st_encode_texts_per_s"] for entry in runs)
    fp32_cosine = min(entry["min_cosine_to_plain"] for entry in runs if entry["dtype"] == "fp32")
    chosen = _chosen_texts_per_call(service, texts, device)
    figures = {
        "model": ctx.model_label,
        "device": device,
        "texts": len(texts),
        "texts_source": sample.source,
        "mean_tokens_per_text": tokens / len(texts),
        "max_seq_length": service.max_seq_length,
        "baseline": f"plain SentenceTransformer.encode(texts) ({BASELINE_TEXTS_PER_CALL} texts per call, fp32), "
                    "same model and texts, best of a run before and a run after the sweep",
        "repeats": REPEATS,
        "baseline_texts_per_s": baseline,
        "baseline_tokens_per_s": per_second(tokens, min(before, after)),
        "baseline_peak_memory_mb": max(memory_before, memory_after),
        "best_texts_per_s": best["texts_per_s"],
        "best_tokens_per_s": best["tokens_per_s"],
        "best_texts_per_call": best["texts_per_call"],
        "best_dtype": best["dtype"],
        "ratio_to_baseline": best["texts_per_s"] / baseline,
        "best_st_encode_texts_per_s": best_former,
        "ratio_to_st_encode": best["texts_per_s"] / best_former,
        "min_cosine_to_plain": min(entry["min_cosine_to_plain"] for entry in runs),
        "min_cosine_to_plain_fp32": fp32_cosine,
        "chosen_texts_per_call": chosen,
        "peak_memory_kind": "CUDA peak allocated" if device == "cuda" else "process RSS peak",
        "runs": runs,
        "targets": {"not_slower_than_baseline": best["texts_per_s"] >= baseline,
                    "pipeline_not_slower_than_st_encode": best["texts_per_s"] >= best_former,
                    f"min_cosine_to_plain_fp32_at_least_{MIN_COSINE}": fp32_cosine >= MIN_COSINE},
    }
    if device == "cuda":
        figures["targets"][f"gpu_texts_per_s_at_least_{GPU_TARGET_TEXTS_PER_S}"] = (
            best["texts_per_s"] >= GPU_TARGET_TEXTS_PER_S
        )
    return figures
