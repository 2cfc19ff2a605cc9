"""The search suite: HNSW latency and recall@10 against exact search, for a sweep of ef_search.

A scratch table of `--rows` vectors gets an HNSW index with the live index's parameters
(segments.models.HNSW_M, HNSW_EF_CONSTRUCTION, cosine distance). The vectors are, by
`--search-vectors`:

- `live`: the live table's own vectors (its first `--rows` that have one): the real thing;
- `words`: each text's words hashed to unit vectors (HashingEncoder) and summed: texts that share
  words are near each other, as similar texts are under a real model;
- `hashing`: HashingEncoder over whole texts: unrelated random vectors, the hardest case for HNSW;
- `model`: the benchmarked model over the texts (slow on a CPU: for small `--rows`);
- `auto` (default): `live` when the live table holds enough vectors, else `words`.

Queries are perturbed row vectors (a random row's vector plus Gaussian noise of norm
QUERY_NOISE, renormalised), so each query has true near neighbours as a real query does.
Recall counts a returned row as found when its distance is within the exact 10th distance
(ties among identical vectors do not count as misses). Latency is the SQL alone (vector given);
the figures "with encoding" add embedding the query text with the model, with torch's
configured thread count and with one thread (on a busy machine, one query's many small
operations can wait for a second thread far longer than they compute).
"""
import contextlib
import io
import re
import struct
import time

import numpy as np
from django.conf import settings
from django.db import connections, transaction

from segments.benchmark.measure import percentile_ms
from segments.benchmark.scratch import quote
from segments.models import HNSW_EF_CONSTRUCTION, HNSW_M

K = 10
DEFAULT_EF_SEARCH = (10, 20, 40, 80, 100, 200, 400, 800)
QUERY_NOISE = 0.5
RECALL_TARGET = 0.95
LATENCY_TARGET_MS = 10
TARGET_ROWS = 100_000
ENCODED_QUERIES = 50
VECTOR_SOURCES = ("auto", "live", "words", "hashing", "model")
WORD = re.compile(r"\w+")
COPY_CHUNK = 20_000
# On a small table the planner prefers a sequential scan; the sweep measures the index.
INDEX_ONLY = "SET LOCAL enable_seqscan = off"


def copy_payload(ids, vectors):
    """Binary COPY data for the columns (id int4, embedding vector(dims))."""
    count, dims = vectors.shape
    rows = np.empty(count, dtype=np.dtype([
        ("fields", ">i2"), ("id_size", ">i4"), ("id", ">i4"),
        ("v_size", ">i4"), ("v_dim", ">i2"), ("v_unused", ">i2"), ("v", ">f4", (dims,)),
    ]))
    rows["fields"], rows["id_size"], rows["id"] = 2, 4, ids
    rows["v_size"], rows["v_dim"], rows["v_unused"], rows["v"] = 4 + 4 * dims, dims, 0, vectors
    return io.BytesIO(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0) + rows.tobytes() + struct.pack(">h", -1))


def word_vectors(texts, dims):
    """Sum of the HashingEncoder vectors of each text's lower-cased words, renormalised."""
    from embeddings.fakes import HashingEncoder

    words = [WORD.findall(text.lower()) or [text] for text in texts]
    vocabulary = sorted({word for text_words in words for word in text_words})
    index = {word: i for i, word in enumerate(vocabulary)}
    table = HashingEncoder(dims).encode_documents(vocabulary)
    flat = np.fromiter((index[word] for text_words in words for word in text_words), dtype=np.int64)
    starts = np.cumsum([0] + [len(text_words) for text_words in words[:-1]])
    vectors = np.add.reduceat(table[flat], starts, axis=0)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def live_vector_count(cursor, column):
    cursor.execute(f"SELECT count({quote(column)}) FROM public.segments")
    return cursor.fetchone()[0]


def choose_source(ctx, cursor):
    wanted = ctx.options.search_vectors
    if wanted != "auto":
        return wanted
    if ctx.column.in_live_table and live_vector_count(cursor, ctx.column.name) >= ctx.options.rows:
        return "live"
    return "words"


def fill_table(ctx, cursor, table, kind):
    """Put `--rows` vectors of kind `kind` into `table`; returns (table holding their texts, description)."""
    rows, dims = ctx.options.rows, ctx.column.dimensions
    if kind == "live":
        column = quote(ctx.column.name)
        cursor.execute(f"INSERT INTO {table} (id, embedding) SELECT id, {column} FROM public.segments "
                       f"WHERE {column} IS NOT NULL ORDER BY id LIMIT %s", [rows])
        return "public.segments", f"the live table's own vectors ({cursor.rowcount:,} rows)"
    source = ctx.source()
    cursor.execute(f"SELECT id, text FROM {source.table} ORDER BY id LIMIT %s", [rows])
    fetched = cursor.fetchall()
    ids, texts = np.array([row[0] for row in fetched]), [row[1] for row in fetched]
    if kind == "words":
        vectors, description = word_vectors(texts, dims), "hashed words of each text, summed (HashingEncoder)"
    elif kind == "hashing":
        from embeddings.fakes import HashingEncoder

        vectors = HashingEncoder(dims).encode_documents(texts)
        description = "HashingEncoder over whole texts (unrelated random vectors: HNSW's hardest case)"
    else:
        vectors, description = ctx.service.encode_documents(texts), f"the model: {ctx.model_label}"
    for start in range(0, len(ids), COPY_CHUNK):
        cursor.cursor.copy_expert(f"COPY {table} (id, embedding) FROM STDIN WITH (FORMAT binary)",
                                  copy_payload(ids[start:start + COPY_CHUNK], vectors[start:start + COPY_CHUNK]))
    return source.table, f"{description}, over {source.description}"


def build_index(cursor, table):
    """Build the HNSW index as migration 0004 does; returns the seconds it took."""
    cursor.execute("SET maintenance_work_mem = %s", [settings.INDEX_MAINTENANCE_WORK_MEM])
    started = time.perf_counter()
    try:
        cursor.execute(f"CREATE INDEX ON {table} USING hnsw (embedding vector_cosine_ops) "
                       f"WITH (m = {int(HNSW_M)}, ef_construction = {int(HNSW_EF_CONSTRUCTION)})")
    finally:
        cursor.execute("RESET maintenance_work_mem")
    seconds = time.perf_counter() - started
    cursor.execute(f"ANALYZE {table}")
    return seconds


def make_queries(cursor, table, text_table, count, seed):
    """(query vectors, texts of their rows): perturbed copies of `count` random rows' vectors."""
    rng = np.random.default_rng(seed)
    cursor.execute(f"SELECT id FROM {table} ORDER BY id")
    ids = np.array([row[0] for row in cursor.fetchall()])
    chosen_ids = [int(i) for i in rng.choice(ids, size=min(count, len(ids)), replace=False)]
    cursor.execute(f"SELECT s.id, s.embedding::text, t.text FROM {table} s JOIN {text_table} t USING (id) "
                   "WHERE s.id = ANY(%s)", [chosen_ids])
    by_id = {row[0]: row[1:] for row in cursor.fetchall()}
    vectors = np.array([by_id[i][0][1:-1].split(",") for i in chosen_ids], dtype=np.float32)
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise *= QUERY_NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = vectors + noise
    return queries / np.linalg.norm(queries, axis=1, keepdims=True), [by_id[i][1] for i in chosen_ids]


def literal(vector):
    return "[" + ",".join(f"{value:.9g}" for value in vector.tolist()) + "]"


def _top_k_sql(table):
    return f"SELECT id, embedding <=> %s::vector FROM {table} ORDER BY embedding <=> %s::vector LIMIT {K}"


def run_queries(cursor, table, literals, settings_sql):
    """(per-query seconds, per-query [(id, distance)]) with `settings_sql` SET LOCAL first."""
    sql, durations, results = _top_k_sql(table), [], []
    with transaction.atomic(using=cursor.db.alias):
        for statement in settings_sql:
            cursor.execute(statement)
        for query in literals:
            started = time.perf_counter()
            cursor.execute(sql, [query, query])
            rows = cursor.fetchall()
            durations.append(time.perf_counter() - started)
            results.append(rows)
    return durations, results


def recall(found, exact):
    """Mean share of each query's exact top K found; a row at the Kth exact distance counts."""
    shares = []
    for rows, truth in zip(found, exact):
        threshold = truth[-1][1] + 1e-6
        shares.append(min(K, sum(1 for _, distance in rows if distance <= threshold)) / len(truth))
    return float(np.mean(shares))


def index_used(cursor, table, query):
    """True when the sweep's plan is an HNSW index scan (the distance matches the opclass)."""
    with transaction.atomic(using=cursor.db.alias):
        cursor.execute(INDEX_ONLY)
        cursor.execute(f"EXPLAIN {_top_k_sql(table)}", [query, query])
        return any("Index Scan" in line for (line,) in cursor.fetchall())


def sweep(ctx, cursor, table, literals, exact):
    results = []
    for ef in ctx.options.ef_search:
        ctx.progress(f"search: ef_search {ef}")
        durations, found = run_queries(cursor, table, literals, [INDEX_ONLY, f"SET LOCAL hnsw.ef_search = {int(ef)}"])
        results.append({"ef_search": ef, "p50_ms": percentile_ms(durations, 50), "p95_ms": percentile_ms(durations, 95),
                        "recall_at_10": recall(found, exact)})
    return results


def chosen(results):
    """The smallest ef_search reaching the recall target, else the one with the best recall."""
    reaching = [entry for entry in results if entry["recall_at_10"] >= RECALL_TARGET]
    if reaching:
        return min(reaching, key=lambda entry: entry["ef_search"]), True
    return max(results, key=lambda entry: (entry["recall_at_10"], -entry["ef_search"])), False


@contextlib.contextmanager
def torch_threads(count):
    """Run the block with torch using `count` threads (None: as configured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def with_encoding(ctx, cursor, table, texts, ef, threads=None):
    """Per-query seconds of embedding the query text with the model plus the SQL, at `ef`."""
    with torch_threads(threads):
        return _with_encoding(ctx, cursor, table, texts, ef)


def _with_encoding(ctx, cursor, table, texts, ef):
    sql, durations = _top_k_sql(table), []
    ctx.service.encode_queries(texts[:1])  # warm-up
    with transaction.atomic(using=cursor.db.alias):
        cursor.execute(INDEX_ONLY)
        cursor.execute(f"SET LOCAL hnsw.ef_search = {int(ef)}")
        for text in texts:
            started = time.perf_counter()
            query = literal(ctx.service.encode_query(text))
            cursor.execute(sql, [query, query])
            cursor.fetchall()
            durations.append(time.perf_counter() - started)
    return durations


def run(ctx):
    """Build the scratch index, sweep ef_search; returns the suite's figures."""
    table = ctx.scratch.table("search")
    with connections[ctx.options.using].cursor() as cursor:
        kind = choose_source(ctx, cursor)
        ctx.progress(f"search: filling {ctx.options.rows:,} rows ({kind} vectors)")
        cursor.execute(f"CREATE TABLE {table} (id int4 PRIMARY KEY, embedding vector({int(ctx.column.dimensions)}))")
        text_table, description = fill_table(ctx, cursor, table, kind)
        ctx.progress("search: building the HNSW index")
        build_seconds = build_index(cursor, table)
        queries, texts = make_queries(cursor, table, text_table, ctx.options.queries, ctx.options.seed)
        literals = [literal(query) for query in queries]
        ctx.progress(f"search: exact top {K} of {len(literals)} queries")
        exact_durations, exact = run_queries(cursor, table, literals, ["SET LOCAL enable_indexscan = off"])
        results = sweep(ctx, cursor, table, literals, exact)
        best, reached = chosen(results)
        ctx.progress("search: with query encoding")
        encoded = with_encoding(ctx, cursor, table, texts[:ENCODED_QUERIES], best["ef_search"])
        encoded_one_thread = with_encoding(ctx, cursor, table, texts[:ENCODED_QUERIES], best["ef_search"], threads=1)
        uses_index = index_used(cursor, table, literals[0])
        rows, index_bytes = table_sizes(cursor, table)
        cursor.execute(f"DROP TABLE {table}")
    return {
        "rows": rows,
        "vectors": kind,
        "vectors_source": description,
        "queries": len(literals),
        "query_vectors": f"perturbed row vectors: a random row's vector plus Gaussian noise of norm {QUERY_NOISE}, "
                         "renormalised",
        "index": f"hnsw (m={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}, vector_cosine_ops)",
        "index_build_s": build_seconds,
        "index_mb": index_bytes / 2**20,
        "index_used": uses_index,
        "exact_p50_ms": percentile_ms(exact_durations, 50),
        "ef_search": best["ef_search"],
        "p50_ms": best["p50_ms"],
        "p95_ms": best["p95_ms"],
        "recall_at_10": best["recall_at_10"],
        "recall_target_reached": reached,
        "with_encoding_p50_ms": percentile_ms(encoded, 50),
        "with_encoding_p95_ms": percentile_ms(encoded, 95),
        "with_encoding_queries": len(encoded),
        "with_encoding_torch_threads": torch_thread_count(),
        "with_encoding_one_thread_p50_ms": percentile_ms(encoded_one_thread, 50),
        "with_encoding_one_thread_p95_ms": percentile_ms(encoded_one_thread, 95),
        "sweep": results,
        "targets": {
            f"p50_under_{LATENCY_TARGET_MS}_ms_at_recall_{RECALL_TARGET}": reached and best["p50_ms"] < LATENCY_TARGET_MS,
            f"measured_on_at_least_{TARGET_ROWS}_rows": rows >= TARGET_ROWS,
        },
    }


def torch_thread_count():
    import torch

    return torch.get_num_threads()


def table_sizes(cursor, table):
    """(rows, bytes of the HNSW index) of the scratch search table."""
    cursor.execute(f"SELECT count(*) FROM {table}")
    rows = cursor.fetchone()[0]
    cursor.execute("SELECT coalesce(sum(pg_relation_size(indexrelid)), 0)::bigint FROM pg_index "
                   "WHERE indrelid = %s::regclass AND NOT indisprimary", [table])
    return rows, cursor.fetchone()[0]
