"""The encode suite: texts/s and tokens/s of the embedding service for a sweep of batch sizes.

Each configuration encodes the same texts through `EmbeddingsService.encode_documents` (the
path the backfill uses), on the configured device: fp32 on the CPU, fp16 and fp32 on CUDA. The
baseline is the plain `SentenceTransformer.encode(texts)` call (its default batch size of 32,
fp32) on the same texts and the same model object, timed once before and once after the sweep.
Every figure is the best of REPEATS runs: on a shared machine, other work only ever slows a run
down, so the fastest run is the truest.
"""
import contextlib

from segments.benchmark.measure import per_second, timed

REPEATS = 2
CPU_BATCH_SIZES = (16, 32, 64)
CUDA_BATCH_SIZES = (64, 128, 256, 512, 1024)
BASELINE_BATCH_SIZE = 32  # SentenceTransformer.encode()'s default
# The target for an H100-class GPU with the bge-small shape.
GPU_TARGET_TEXTS_PER_S = 10_000


def default_batch_sizes(device):
    return CUDA_BATCH_SIZES if device == "cuda" else CPU_BATCH_SIZES


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


def _sweep(service, texts, tokens, batch_sizes, device, progress):
    runs = []
    for dtype in dtypes_for(device):
        with model_dtype(service.model, dtype):
            service.encode_documents(texts[: max(batch_sizes)], batch_size=max(batch_sizes))  # warm-up
            for batch_size in batch_sizes:
                progress(f"encode: {dtype}, batch size {batch_size}")
                seconds, memory = best_of(lambda: service.encode_documents(texts, batch_size=batch_size), device)
                runs.append({
                    "dtype": dtype, "batch_size": batch_size, "seconds": seconds,
                    "texts_per_s": per_second(len(texts), seconds),
                    "tokens_per_s": per_second(tokens, seconds),
                    "peak_memory_mb": memory,
                })
    return runs


def run(ctx):
    """Measure the service against plain encode(); returns the suite's figures."""
    service, device = ctx.service, ctx.device
    sample = ctx.texts()
    texts = sample.texts
    batch_sizes = ctx.options.batch_sizes or default_batch_sizes(device)
    tokens = count_tokens(service.model, texts)

    ctx.progress("encode: warming up, then plain SentenceTransformer.encode() as the baseline")
    with model_dtype(service.model, "fp32"):
        service.model.encode(texts[:BASELINE_BATCH_SIZE], show_progress_bar=False)
    before, memory_before = _baseline(service.model, texts, device)
    runs = _sweep(service, texts, tokens, batch_sizes, device, ctx.progress)
    ctx.progress("encode: the baseline again")
    after, memory_after = _baseline(service.model, texts, device)

    baseline = per_second(len(texts), min(before, after))
    for entry in runs:
        entry["ratio_to_baseline"] = entry["texts_per_s"] / baseline
    best = max(runs, key=lambda entry: entry["texts_per_s"])
    figures = {
        "model": ctx.model_label,
        "device": device,
        "texts": len(texts),
        "texts_source": sample.source,
        "mean_tokens_per_text": tokens / len(texts),
        "max_seq_length": service.max_seq_length,
        "baseline": f"plain SentenceTransformer.encode(texts) (batch size {BASELINE_BATCH_SIZE}, fp32), "
                    "same model and texts, best of a run before and a run after the sweep",
        "repeats": REPEATS,
        "baseline_texts_per_s": baseline,
        "baseline_tokens_per_s": per_second(tokens, min(before, after)),
        "baseline_peak_memory_mb": max(memory_before, memory_after),
        "best_texts_per_s": best["texts_per_s"],
        "best_tokens_per_s": best["tokens_per_s"],
        "best_batch_size": best["batch_size"],
        "best_dtype": best["dtype"],
        "ratio_to_baseline": best["texts_per_s"] / baseline,
        "peak_memory_kind": "CUDA peak allocated" if device == "cuda" else "process RSS peak",
        "runs": runs,
        "targets": {"not_slower_than_baseline": best["texts_per_s"] >= baseline},
    }
    if device == "cuda":
        figures["targets"][f"gpu_texts_per_s_at_least_{GPU_TARGET_TEXTS_PER_S}"] = (
            best["texts_per_s"] >= GPU_TARGET_TEXTS_PER_S
        )
    return figures
