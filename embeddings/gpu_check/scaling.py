"""Tokenization alone with 1, 2, ... threads, up to the CPUs the run may use: how far it scales.

The pipeline's tokenizer pool (embeddings/tokenization.py) tokenizes SCALING_TEXTS demo texts in
batches of SCALING_TEXTS_PER_CALL (pinned on CUDA, as the pipeline pins them), drained in order by
a consumer that does nothing else. Each thread runs on one core (TOKENIZERS_PARALLELISM=false), so
that N threads are N cores. The thread counts are measured in ROUNDS interleaved rounds (1, 2, ...,
N, then again) and the best of each is kept: a neighbour's burst on a shared machine lowers one
round, not the ratio; the machine's load average is kept beside them. Also `model.preprocess` on
one thread over the same batches, with the tokenizer's own settings: the tokenization the pipeline
ran before.

`tokenization_scaling` is {threads: texts/s}; `tokenization` says how it was measured.
"""
import os

from embeddings import tokenization
from embeddings.batches import plan_batches
from embeddings.gpu_check.materials import segment_texts, token_counts
from embeddings.gpu_check.measure import is_cuda, rate

SCALING_TEXTS = 4096
SCALING_TEXTS_PER_CALL = 256  # a GPU's usual texts per call: the tokenizer's rate barely depends on it
ROUNDS = 5
MIN_SECONDS = 0.15  # each figure: calls back to back for at least this long (one call of 4,096 texts is longer)


def _pool_rate(model, texts, batches, tokens, threads, pin):
    def call():
        with tokenization.Tokenization(model, threads, pin) as pool:
            tokenization.tokenize_batches(pool, texts, batches)

    return rate(call, len(texts), tokens, "cpu", MIN_SECONDS)["texts_per_s"]


def _preprocess_rate(model, texts, batches, tokens):
    def call():
        for batch in batches:
            tokenization.preprocess(model, [texts[i] for i in batch])

    return rate(call, len(texts), tokens, "cpu", MIN_SECONDS)["texts_per_s"]


def _rounds(run, texts, batches, tokens, counts):
    """{threads: best texts/s} over ROUNDS interleaved rounds, fewer if the run's deadline passes."""
    best, pin = {}, is_cuda(run.device)
    for number in range(ROUNDS):
        if best and run.clock.expired():
            run.skip(f"tokenization scaling, rounds {number + 1}-{ROUNDS}", "past the run's deadline")
            break
        for threads in counts:
            figure = _pool_rate(run.model, texts, batches, tokens, threads, pin)
            best[threads] = max(best.get(threads, 0.0), figure)
    return best


def tokenization_scaling(run):
    """({threads: texts/s} for 1 up to the usable CPUs, how it was measured); (None, None) past the deadline."""
    if run.out_of_time("tokenization scaling"):
        return None, None
    cpus = tokenization.usable_cpus()
    run.progress(f"tokenization alone with 1 to {cpus} threads, {ROUNDS} rounds")
    texts = segment_texts(SCALING_TEXTS, run.plan.seed)
    tokens = sum(token_counts(run.model, texts))
    batches = plan_batches(texts, SCALING_TEXTS_PER_CALL, run.model.max_seq_length or 512)
    former = _preprocess_rate(run.model, texts, batches, tokens)  # before one_core_a_thread changes the setting
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    tokenization.one_core_a_thread()
    best = _rounds(run, texts, batches, tokens, range(1, cpus + 1))
    with tokenization.Tokenization(run.model, cpus) as pool:
        path = pool.path
    scaling = {str(threads): round(figure, 1) for threads, figure in best.items()}
    load = [round(value, 2) for value in os.getloadavg()]  # what else ran: a busy neighbour takes cores
    details = {"texts": len(texts), "texts_per_call": SCALING_TEXTS_PER_CALL, "batches": len(batches),
               "rounds": ROUNDS, "cpus": cpus, "path": path.replace(f"{cpus} threads", "N threads"),
               "speedup": {key: round(value / best[1], 2) for key, value in scaling.items()},
               "model_preprocess_one_thread": round(former, 1),
               "model_preprocess_tokenizers_parallelism": parallelism,
               "pipeline_threads": tokenization.default_threads(run.device), "load_average": load}
    return scaling, details
