"""Plain `SentenceTransformer.encode` against the project's pipeline: a sweep of batch sizes and dtypes.

At each (dtype, batch size) both paths encode the same texts with the same model object, after a
warm-up, for the run's budget of seconds each. The baseline is plain `encode(texts)` (its default
batch size of 32, fp32), what the project ran before the pipeline. The pipeline's vectors are
compared with `encode`'s text by text (cosine), so that its figures are for the same work.
"""
import numpy as np

from embeddings import pipeline
from embeddings.gpu_check.materials import set_dtype
from embeddings.gpu_check.measure import free_cuda_memory, is_out_of_memory

AGREEMENT_TEXTS = 256
BASELINE_BATCH_SIZE = 32  # SentenceTransformer.encode()'s default
BACKFILL_ROWS_PER_CALL = 1000  # backfill_embeddings' default --batch-size: texts per encode call


def st_encode(model, texts, batch_size):
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def pipeline_encode(model, texts, batch_size):
    return pipeline.encode(model, texts, batch_size)


PATHS = {"st_encode": st_encode, "pipeline": pipeline_encode}


def measure_path(run, path, batch_size):
    """Figures of `path` ("st_encode" or "pipeline") at `batch_size` over the run's texts."""
    encode = PATHS[path]
    encode(run.model, run.warm_texts(), batch_size)
    return run.rate(lambda: encode(run.model, run.texts, batch_size))


def baseline(run):
    """Plain `SentenceTransformer.encode(texts)`, batch size 32, fp32."""
    run.progress(f"fp32: plain SentenceTransformer.encode(texts) (batch size {BASELINE_BATCH_SIZE}), the baseline")
    set_dtype(run.model, "fp32")
    return {"dtype": "fp32", "batch_size": BASELINE_BATCH_SIZE, **measure_path(run, "st_encode", BASELINE_BATCH_SIZE)}


def compare(run, dtype, batch_size):
    """Both paths at one configuration; the pipeline's speed over `encode`'s."""
    run.progress(f"{dtype}, batch size {batch_size}: SentenceTransformer.encode, then the pipeline")
    st = measure_path(run, "st_encode", batch_size)
    mine = measure_path(run, "pipeline", batch_size)
    return {"dtype": dtype, "batch_size": batch_size, "st_encode": st, "pipeline": mine,
            "ratio": round(mine["texts_per_s"] / st["texts_per_s"], 3)}


def _sweep_dtype(run, dtype):
    rows = []
    for batch_size in run.plan.batch_sizes:
        if run.out_of_time(f"{dtype}, batch size {batch_size}"):
            continue
        try:
            rows.append(compare(run, dtype, batch_size))
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            free_cuda_memory(run.device)
            run.skip(f"{dtype}, batch size {batch_size} and larger", "out of device memory")
            break
    return rows


def sweep(run):
    """One row per (dtype, batch size) of the plan, fp32 first."""
    rows = []
    for dtype in run.plan.dtypes:
        set_dtype(run.model, dtype)
        rows.extend(_sweep_dtype(run, dtype))
    return rows


def best(rows, path="pipeline"):
    """The row whose `path` encoded fastest."""
    return max(rows, key=lambda row: row[path]["texts_per_s"])


def min_cosine(vectors, reference):
    """The smallest cosine between matching rows of two arrays of vectors."""
    vectors, reference = np.asarray(vectors, np.float32), np.asarray(reference, np.float32)
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    return float(np.min(np.sum(vectors * reference, axis=1) / np.maximum(norms, 1e-12)))


def agreement(run):
    """The smallest cosine, text by text, between the pipeline's vectors in each dtype and
    fp32 `SentenceTransformer.encode`'s. Run before any fp16 pass rounds the weights."""
    sample = run.texts[:AGREEMENT_TEXTS]
    set_dtype(run.model, "fp32")
    reference = st_encode(run.model, sample, BASELINE_BATCH_SIZE)
    cosines = {}
    for dtype in run.plan.dtypes:
        set_dtype(run.model, dtype)
        cosines[dtype] = round(min_cosine(pipeline_encode(run.model, sample, BASELINE_BATCH_SIZE), reference), 5)
    set_dtype(run.model, "fp32")
    return {"texts": len(sample), "min_cosine_to_st_encode_fp32": cosines}


def backfill_calls(run, row):
    """The pipeline at `row`'s configuration in calls of BACKFILL_ROWS_PER_CALL texts, as a backfill
    calls it, against one call of all the texts. None (with the reason) when not measured."""
    if len(run.texts) <= BACKFILL_ROWS_PER_CALL:
        run.skip("calls of a backfill batch", f"the run embeds {len(run.texts)} texts a call, no more than a "
                 f"backfill batch ({BACKFILL_ROWS_PER_CALL})")
        return None
    if run.out_of_time("calls of a backfill batch"):
        return None
    size = BACKFILL_ROWS_PER_CALL
    chunks = [run.texts[start:start + size] for start in range(0, len(run.texts), size)]
    run.progress(f"{row['dtype']}, batch size {row['batch_size']}: the pipeline in calls of {size} texts")
    set_dtype(run.model, row["dtype"])
    figures = run.rate(lambda: [pipeline_encode(run.model, chunk, row["batch_size"]) for chunk in chunks])
    return {"dtype": row["dtype"], "batch_size": row["batch_size"], "texts_per_call": BACKFILL_ROWS_PER_CALL,
            **figures, "against_one_call": round(figures["texts_per_s"] / row["pipeline"]["texts_per_s"], 3)}
