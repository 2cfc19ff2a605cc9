"""A backfill's claims: in one call each, and streamed into one pipeline, against one large call.

`backfill_embeddings` embeds its rows claim by claim (1,000 rows: its default --batch-size; the check's
--rows-per-claim). At the best configuration, the run's texts cut into claims of that many are encoded:

- in calls: `pipeline.encode` once per claim, one after the other (each call starts its tokenizer
  threads, waits for its first batch, and ends with a synchronisation);
- streamed: every claim submitted to one `EncodeStream` (embeddings/stream.py) from a thread of its
  own, as a backfill's claim stage hands them over, each claim's vectors read back in order.

`against_one_call` is each rate over the pipeline's rate for all the texts in one call (the sweep's
figure at that configuration): 1.0 means the claims cost nothing.
"""
from embeddings import pipeline
from embeddings.gpu_check.materials import set_dtype
from embeddings.stream import EncodeStream


def in_calls(model, claims, texts_per_call):
    return [pipeline.encode(model, claim, texts_per_call) for claim in claims]


def streamed(model, claims, texts_per_call):
    """Every claim through one EncodeStream, submitted from another thread; the vectors in order."""
    with EncodeStream(model, texts_per_call) as stream:
        stream.feed((number, claim) for number, claim in enumerate(claims))
        vectors = []
        for result in stream.results():
            if result.error is not None:
                raise result.error
            vectors.append(result.vectors)
    return vectors


def _figures(run, row, encode, claims):
    figures = run.rate(lambda: encode(run.model, claims, row["texts_per_call"]))
    return {**figures, "against_one_call": round(figures["texts_per_s"] / row["pipeline"]["texts_per_s"], 3)}


def backfill_calls(run, row):
    """The claims in calls and streamed at `row`'s configuration (a sweep row); None, with the reason, when
    the run's texts are no more than one claim or its deadline has passed."""
    size = run.plan.rows_per_claim
    if len(run.texts) <= size:
        run.skip("calls of a backfill claim", f"the run embeds {len(run.texts)} texts a call, no more than a "
                 f"backfill claim ({size} rows, --rows-per-claim)")
        return None
    if run.out_of_time("calls of a backfill claim"):
        return None
    claims = [run.texts[start:start + size] for start in range(0, len(run.texts), size)]
    set_dtype(run.model, row["dtype"])
    run.progress(f"{row['dtype']}, {row['texts_per_call']} texts per call: {len(claims)} claims of "
                 f"{size} texts in calls, then streamed")
    calls = _figures(run, row, in_calls, claims)
    section = {"dtype": row["dtype"], "texts_per_call": row["texts_per_call"], "rows_per_claim": size,
               "claims": len(claims), **calls}
    if not run.out_of_time("claims streamed into one pipeline"):
        section["streamed"] = _figures(run, row, streamed, claims)
    return section
