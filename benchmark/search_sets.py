"""Where the search suite's rows and queries come from (`--search-vectors`), as float32 arrays.

- `live`: the live table's own vectors (its first `--rows` that have one, read by binary COPY):
  the real thing;
- `derived`: real vectors of a base of texts embedded by the model, and rows derived from them
  that keep their neighbourhoods (derived.py documents and checks the method);
- `words`: each text's words hashed to unit vectors (HashingEncoder) and summed: texts that share
  words are near each other, as similar texts are under a real model;
- `hashing`: HashingEncoder over whole texts: unrelated random vectors, the hardest case for HNSW;
- `model`: the benchmarked model over the texts (slow on a CPU: for small `--rows`);
- `auto` (default): `live` when the live table holds enough vectors, else `words`.

Queries of a derived table are real texts outside its base, embedded as queries; otherwise they
are perturbed row vectors (a random row's vector plus Gaussian noise of norm QUERY_NOISE,
renormalised), so each query has true near neighbours as a real query does.
"""
import io
import re
from dataclasses import dataclass, field

import numpy as np

from benchmark import derived
from benchmark.scratch import quote

QUERY_NOISE = 0.5
VECTOR_SOURCES = ("auto", "live", "derived", "words", "hashing", "model")
WORD = re.compile(r"\w+")


class SearchVectorsUnavailable(ValueError):
    """The vectors `--search-vectors` asks for cannot be had; the message says what to do."""


@dataclass
class SearchSet:
    """The rows and queries of one run, as float32 arrays, and where they came from."""

    kind: str
    ids: np.ndarray  # ascending
    vectors: np.ndarray
    queries: np.ndarray
    query_texts: list  # the texts of the queries, embedded again for the figures "with encoding"
    description: str
    query_description: str
    details: dict = field(default_factory=dict)  # derived vectors: the base, the cache, the method
    real: np.ndarray | None = None  # derived vectors: the real base vectors (for --check-derived)


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


# --- the rows and queries ---------------------------------------------------------------------

def perturbed_queries(vectors, count, seed):
    """(queries, the rows they were made from): `count` random rows plus noise of norm QUERY_NOISE."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(vectors), size=min(count, len(vectors)), replace=False)
    noise = rng.standard_normal((len(chosen), vectors.shape[1])).astype(np.float32)
    noise *= QUERY_NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
    return derived.normalise(vectors[chosen] + noise), chosen


def read_live(cursor, column, dims, rows):
    """(ids, float32 vectors) of the live table's first `rows` vectors, by binary COPY out."""
    buffer = io.BytesIO()
    cursor.cursor.copy_expert(
        f"COPY (SELECT id, {quote(column)}::vector({int(dims)}) FROM public.segments WHERE {quote(column)} IS NOT NULL "
        f"ORDER BY id LIMIT {int(rows)}) TO STDOUT WITH (FORMAT binary)", buffer)
    row = np.dtype([("fields", ">i2"), ("id_size", ">i4"), ("id", ">i4"), ("v_size", ">i4"), ("v_dim", ">i2"),
                    ("v_unused", ">i2"), ("v", ">f4", (int(dims),))])
    data = buffer.getbuffer()
    header, trailer = 19, 2  # signature, flags, extension length; the -1 field count
    found = np.frombuffer(data, row, count=(len(data) - header - trailer) // row.itemsize, offset=header)
    return found["id"].astype(np.int64), found["v"].astype(np.float32)


def live_set(ctx, cursor):
    ids, vectors = read_live(cursor, ctx.column.name, ctx.column.dimensions, ctx.options.rows)
    if not len(ids):
        raise SearchVectorsUnavailable(f"--search-vectors live: segments.{ctx.column.name} holds no vector yet. "
                                       "Run the backfill first, or pass --search-vectors derived.")
    queries, chosen = perturbed_queries(vectors, ctx.options.queries, ctx.options.seed)
    cursor.execute("SELECT id, text FROM public.segments WHERE id = ANY(%s)", [[int(i) for i in ids[chosen]]])
    texts = dict(cursor.fetchall())
    return SearchSet("live", ids, vectors, queries, [texts[int(i)] for i in ids[chosen]],
                     f"the live table's own vectors ({len(ids):,} rows)", _perturbed())


def text_set(ctx, cursor, kind):
    source = ctx.source()
    cursor.execute(f"SELECT id, text FROM {source.table} ORDER BY id LIMIT %s", [ctx.options.rows])
    fetched = cursor.fetchall()
    ids, texts = np.array([row[0] for row in fetched]), [row[1] for row in fetched]
    dims = ctx.column.dimensions
    if kind == "words":
        vectors, description = word_vectors(texts, dims), "hashed words of each text, summed (HashingEncoder)"
    elif kind == "hashing":
        from embeddings.fakes import HashingEncoder

        vectors = HashingEncoder(dims).encode_documents(texts)
        description = "HashingEncoder over whole texts (unrelated random vectors: HNSW's hardest case)"
    else:
        vectors, description = ctx.service.encode_documents(texts), f"the model: {ctx.model_label}"
    vectors = np.asarray(vectors, dtype=np.float32)
    queries, chosen = perturbed_queries(vectors, ctx.options.queries, ctx.options.seed)
    return SearchSet(kind, ids, vectors, queries, [texts[i] for i in chosen],
                     f"{description}, over {source.description}", _perturbed())


def _perturbed():
    return f"perturbed row vectors: a random row's vector plus Gaussian noise of norm {QUERY_NOISE}, renormalised"


def derived_set(ctx):
    """The base texts embedded (or read from the cache), the rows derived from them, real queries."""
    options = ctx.options
    base_count, cache = min(options.derive_base, options.rows), options.vector_cache or derived.default_cache()
    texts, texts_source = derived.distinct_texts(base_count + options.queries, options.seed, options.using)
    ctx.progress(f"search: embedding {base_count:,} base texts and {options.queries} query texts (cache: {cache})")
    base, base_cached = derived.embedded(ctx.service, texts[:base_count], "documents", cache, ctx.model_label)
    queries, queries_cached = derived.embedded(ctx.service, texts[base_count:], "queries", cache, ctx.model_label)
    ctx.progress(f"search: deriving {options.rows:,} rows from {base_count:,} real vectors")
    vectors = derived.derive(base, options.rows, options.seed)
    details = {"base_vectors": base_count, "texts": texts_source, "cache": str(cache),
               "from_cache": base_cached and queries_cached, "method": derived.method()}
    return SearchSet("derived", np.arange(1, options.rows + 1), vectors, queries, texts[base_count:],
                     f"{options.rows:,} rows derived from {base_count:,} real vectors ({ctx.model_label} over "
                     f"{texts_source}; derived.py)", f"{len(queries)} real texts outside the base, embedded as queries",
                     details, real=base)


def search_set(ctx, cursor):
    """The SearchSet of `--search-vectors` (`auto` chosen here)."""
    kind = choose_source(ctx, cursor)
    ctx.progress(f"search: preparing {ctx.options.rows:,} rows ({kind} vectors)")
    if kind == "live":
        return live_set(ctx, cursor)
    if kind == "derived":
        return derived_set(ctx)
    return text_set(ctx, cursor, kind)
