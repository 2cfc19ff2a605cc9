"""The backfill suite: the real backfill engine over scratch segments, against raw encode().

The engine (segments.switch.backfill.run_backfill) runs with `search_path` set to the scratch schema,
which holds its own `segments` (shaped like the live table, without vector indexes, with the
staleness trigger), `embeddings_quarantine` and `embeddings_backfill_claim`.

1. With the model: `--texts` segments. The same non-blank texts go through raw
   `encode_documents()` in the engine's batches (rows per claim and transaction: `--batch-size`,
   default the engine's DEFAULT_BATCH_SIZE) with the same model batch size
   (EMBEDDING_BATCH_SIZE), and through the backfill, which embeds and writes them. The model
   does the same work both times, so the ratio of the two rates is the share of the model's
   speed the engine keeps. (The engine's batch size matters on its own: the model sorts texts
   by length only within one call, so small engine batches pad more and encode slower.)
2. With the zero-cost HashingEncoder over `--rows` segments, at the engine's default batch
   size: the database's ceiling.
"""
from django.db import connections

from segments.benchmark.measure import per_second, timed
from segments.benchmark.scratch import copy_table
from segments.benchmark.source import segments_copy
from segments import triggers
from segments.models import BLANK_TEXT_PATTERN

TARGET_RATIO = 0.9
# Raw encode and the engine run alternately this many times, and each keeps its fastest run:
# drift on a shared machine then does not favour either side.
ROUNDS = 2


def engine_batch_size(ctx):
    """Rows per engine batch: `--batch-size`, else the engine's default."""
    from segments.switch.backfill import DEFAULT_BATCH_SIZE

    return ctx.options.backfill_batch_size or DEFAULT_BATCH_SIZE


def prepare_tables(ctx, rows):
    """(Re)create the scratch segments, quarantine and claim tables; `rows` segments to embed."""
    scratch = ctx.scratch
    with connections[ctx.options.using].cursor() as cursor:
        for name in ("segments", "embeddings_quarantine", "embeddings_backfill_claim"):
            cursor.execute(f"DROP TABLE IF EXISTS {scratch.table(name)}")
        table = segments_copy(cursor, scratch, ctx.source(), "segments", rows, ctx.column)
        copy_table(cursor, scratch, "embeddings_quarantine")
        copy_table(cursor, scratch, "embeddings_backfill_claim")
        with scratch.searched_first(cursor):
            cursor.execute(triggers.create_sql(ctx.column.name))
    return table


def texts_to_embed(ctx, table):
    with connections[ctx.options.using].cursor() as cursor:
        cursor.execute(f"SELECT text FROM {table} WHERE text !~ %s ORDER BY id", [BLANK_TEXT_PATTERN])
        return [text for (text,) in cursor.fetchall()]


def backfill(ctx, encoder, batch_size):
    """Run the engine over the scratch schema; (report, wall seconds)."""
    from segments.switch.backfill import run_backfill

    result = {}

    def call():
        result["report"] = run_backfill(encoder, batch_size=batch_size, search_path=ctx.scratch.search_path,
                                        using=ctx.options.using)

    seconds, _ = timed(call)
    return result["report"], seconds


def _report_figures(report, seconds):
    return {
        "rows_embedded": report.rows_embedded,
        "rows_quarantined": report.rows_quarantined,
        "rows_remaining": report.rows_remaining,
        "rows_blank": report.rows_blank,
        "seconds": seconds,
        "rows_per_s": per_second(report.rows_embedded, seconds),
    }


def encode_in_batches(service, texts, batch_size):
    """Raw encode_documents() over the engine's batches: the same model work the engine does."""
    for start in range(0, len(texts), batch_size):
        service.encode_documents(texts[start:start + batch_size])


def with_model(ctx):
    """(raw encode texts/s, the engine's figures): the best of ROUNDS alternating rounds."""
    table = prepare_tables(ctx, ctx.texts_count)
    texts = texts_to_embed(ctx, table)
    batch_size = engine_batch_size(ctx)
    ctx.service.encode_documents(texts[: ctx.service.batch_size])  # warm-up
    encode_seconds, runs = [], []
    for round_number in range(1, ROUNDS + 1):
        ctx.progress(f"backfill: round {round_number}: raw encode_documents() of {len(texts):,} texts")
        encode_seconds.append(timed(lambda: encode_in_batches(ctx.service, texts, batch_size), ctx.device)[0])
        if round_number > 1:
            prepare_tables(ctx, ctx.texts_count)
        ctx.progress(f"backfill: round {round_number}: the engine over the same {len(texts):,} segments")
        runs.append(backfill(ctx, ctx.service, batch_size))
    report, seconds = min(runs, key=lambda run: run[1])
    return per_second(len(texts), min(encode_seconds)), {"engine_batch_size": batch_size,
                                                         **_report_figures(report, seconds)}


def with_fake_encoder(ctx):
    from embeddings.fakes import HashingEncoder

    prepare_tables(ctx, ctx.options.rows)
    ctx.progress(f"backfill: the engine with the zero-cost HashingEncoder over {ctx.options.rows:,} segments")
    report, seconds = backfill(ctx, HashingEncoder(ctx.column.dimensions), None)
    from segments.switch.backfill import DEFAULT_BATCH_SIZE

    return {"engine_batch_size": DEFAULT_BATCH_SIZE, **_report_figures(report, seconds)}


def run(ctx):
    """Measure the engine with the model and with the fake encoder; returns the suite's figures."""
    encode_rate, model_run = with_model(ctx)
    fake_run = with_fake_encoder(ctx)
    ratio = model_run["rows_per_s"] / encode_rate
    return {
        "model": ctx.model_label,
        "device": ctx.device,
        "batch_size": ctx.service.batch_size,
        "engine_batch_size": model_run["engine_batch_size"],
        "rows_source": ctx.source().description,
        "encode_texts_per_s": encode_rate,
        "backfill_rows_per_s": model_run["rows_per_s"],
        "ratio": ratio,
        "fake_encoder_rows_per_s": fake_run["rows_per_s"],
        "with_model": model_run,
        "with_fake_encoder": {"encoder": "HashingEncoder (no model)", **fake_run},
        "rounds": ROUNDS,
        "targets": {f"ratio_at_least_{TARGET_RATIO}": ratio >= TARGET_RATIO},
    }
