"""Plain `SentenceTransformer.encode` against the project's pipeline: a sweep of texts per model call and dtypes.

At each (dtype, texts per call) both paths encode the same texts with the same model object, after a
warm-up, for the run's budget of seconds each. The baseline is plain `encode(texts)` (its default
of 32 texts per call, fp32), what the project ran before the pipeline. The pipeline's vectors are
compared with `encode`'s text by text (cosine), so that its figures are for the same work.
"""
import numpy as np

from embeddings import pipeline
from embeddings.gpu_check.materials import set_dtype
from embeddings.gpu_check.measure import free_cuda_memory, is_out_of_memory

AGREEMENT_TEXTS = 256
BASELINE_TEXTS_PER_CALL = 32  # SentenceTransformer.encode()'s default batch_size


def st_encode(model, texts, texts_per_call):
    return model.encode(texts, batch_size=texts_per_call, convert_to_numpy=True, show_progress_bar=False)


def pipeline_encode(model, texts, texts_per_call):
    return pipeline.encode(model, texts, texts_per_call)


PATHS = {"st_encode": st_encode, "pipeline": pipeline_encode}


def measure_path(run, path, texts_per_call):
    """Figures of `path` ("st_encode" or "pipeline") at `texts_per_call` over the run's texts."""
    encode = PATHS[path]
    encode(run.model, run.warm_texts(), texts_per_call)
    return run.rate(lambda: encode(run.model, run.texts, texts_per_call))


def baseline(run):
    """Plain `SentenceTransformer.encode(texts)`, 32 texts per call, fp32."""
    run.progress(f"fp32: plain SentenceTransformer.encode(texts) ({BASELINE_TEXTS_PER_CALL} texts per call), "
                 "the baseline")
    set_dtype(run.model, "fp32")
    return {"dtype": "fp32", "texts_per_call": BASELINE_TEXTS_PER_CALL,
            **measure_path(run, "st_encode", BASELINE_TEXTS_PER_CALL)}


def compare(run, dtype, texts_per_call):
    """Both paths at one configuration; the pipeline's speed over `encode`'s."""
    run.progress(f"{dtype}, {texts_per_call} texts per call: SentenceTransformer.encode, then the pipeline")
    st = measure_path(run, "st_encode", texts_per_call)
    mine = measure_path(run, "pipeline", texts_per_call)
    return {"dtype": dtype, "texts_per_call": texts_per_call, "st_encode": st, "pipeline": mine,
            "ratio": round(mine["texts_per_s"] / st["texts_per_s"], 3)}


def _sweep_dtype(run, dtype):
    rows = []
    for texts_per_call in run.plan.texts_per_call:
        if run.out_of_time(f"{dtype}, {texts_per_call} texts per call"):
            continue
        try:
            rows.append(compare(run, dtype, texts_per_call))
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            free_cuda_memory(run.device)
            run.skip(f"{dtype}, {texts_per_call} texts per call and more", "out of device memory")
            break
    return rows


def sweep(run):
    """One row per (dtype, texts per call) of the plan, fp32 first."""
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
    reference = st_encode(run.model, sample, BASELINE_TEXTS_PER_CALL)
    cosines = {}
    for dtype in run.plan.dtypes:
        set_dtype(run.model, dtype)
        cosines[dtype] = round(min_cosine(pipeline_encode(run.model, sample, BASELINE_TEXTS_PER_CALL), reference), 5)
    set_dtype(run.model, "fp32")
    return {"texts": len(sample), "min_cosine_to_st_encode_fp32": cosines}

