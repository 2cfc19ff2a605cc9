"""Realistic search vectors at sizes the model cannot embed here: real vectors, and vectors derived from them.

Random unit vectors are far harder for HNSW than real embeddings (their neighbours are barely
nearer than anything else), and a million real embeddings take hours on a CPU (~50 texts/s on
2 cores at best: 100,000 would already take ~35 minutes). `--search-vectors derived` therefore
embeds a base of real texts with the benchmarked model (`--derive-base`, 8,000 by default: a
few minutes once, then cached), and derives every row of the table from them:

    row = normalise(base[i] + SPREAD / sqrt(m) * sum_k g_k * (base[n_k(i)] - base[i]))

- `i` runs over the base vectors in turn (each origin gets the same number of rows);
- `n_1(i) .. n_m(i)` are the m = NEIGHBOURS nearest base vectors of `i`, and the `g_k` are
  standard normal: the row is a Gaussian sample around `i` whose spread follows the directions
  and distances of its real neighbours. It stays within the local shape of the real set (a few
  dozen dimensions, not 384), dense where the real vectors are dense and wide where they are
  sparse, and its near neighbours are rows derived from the same or neighbouring base vectors.

The parameters were chosen by the check below on all-MiniLM-L6-v2 vectors of the demo texts.
Measured there (8,000 real vectors, recall@10 at ef_search 10: 0.95): isotropic noise in all 384
dimensions makes each origin's rows a little cloud of random vectors, harder for HNSW than real
data (0.73-0.80 at 16x expansion); rows on the segment from `i` to one neighbour, or convex
mixtures of a few neighbours, pile up near the base vectors and are harder too (0.75-0.83). The
Gaussian over 30 neighbours matched best (0.90-0.94 at 4x and 16x; from ef_search 40 on, within
0.01 of the real curve).

The method is checked, not assumed (`--check-derived`): with B = `--derive-base` real vectors,
a table of the B real vectors and tables of B vectors derived from the first B/4 and B/16 of
them get the same HNSW index and the same real queries, and their recall@10 against ef_search
curves are reported side by side with their largest difference (a table of random vectors is
measured too, to show how far apart the easy and the hard case are). The check covers a 4x and
a 16x expansion; a million rows from 8,000 base vectors is 125x. The derived curve falls a
little below the real one as the expansion grows: the derived table is the harder one, so its
recall is a cautious figure for a real table of the same size, not a flattering one. Real
vectors at 100,000 rows or more would settle it, at ~35 minutes of encoding per 100,000 on a
2-core CPU (minutes on a GPU).

Queries of a derived table are real too: distinct texts not in the base, embedded as queries.
The texts are the segments table's own (random distinct ones) topped up with generated
transcript-like text (segments/demo_data.py).
"""
import hashlib
import logging
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import connections

from segments.schema import BLANK_TEXT_PATTERN

logger = logging.getLogger(__name__)

SPREAD = 1.0
NEIGHBOURS = 30
CHUNK = 50_000
CHECK_FRACTIONS = (4, 16)  # the check derives B vectors from B/4 and from B/16 real ones
MIN_BASE = 2  # a base vector needs a neighbour


def default_cache():
    """Where embedded base texts are cached unless --vector-cache says otherwise."""
    return Path(settings.BASE_DIR) / ".benchmark-cache"


def normalise(vectors):
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


# --- the texts and their real vectors -----------------------------------------------------------

def distinct_texts(count, seed=0, using="default"):
    """(`count` distinct non-blank texts, in words where they came from): the segments table's, in
    random order, then generated transcript-like texts (segments/demo_data.py) for the rest."""
    from segments.demo_data import generate_texts

    with connections[using].cursor() as cursor:
        cursor.execute("SELECT text FROM (SELECT DISTINCT text FROM public.segments WHERE text !~ %s) t "
                       "ORDER BY md5(text || %s) LIMIT %s", [BLANK_TEXT_PATTERN, str(seed), count])
        texts = [text for (text,) in cursor.fetchall()]
    live, wanted = len(texts), count - len(texts)
    seen = set(texts)
    generated = [text for text in dict.fromkeys(generate_texts(2 * wanted + 100, seed)) if text not in seen]
    if len(generated) < wanted:
        raise ValueError(f"the generated texts hold only {len(generated):,} distinct ones, {wanted:,} are needed")
    texts += generated[:wanted]
    if not wanted:
        return texts, f"{count:,} distinct segments of the segments table"
    if not live:
        return texts, f"{count:,} distinct generated transcript-like texts (segments/demo_data.py)"
    return texts, f"{live:,} distinct segments of the segments table + {wanted:,} generated texts"


def cache_path(cache_dir, model_label, kind, texts):
    """The .npy file caching `texts` embedded as `kind` ("documents" or "queries") by the model."""
    digest = hashlib.sha256()
    for part in (model_label, kind, *texts):
        digest.update(part.encode())
        digest.update(b"\0")
    return Path(cache_dir) / f"{kind}-{len(texts)}-{digest.hexdigest()[:16]}.npy"


def embedded(service, texts, kind, cache_dir, model_label):
    """(float32 vectors of `texts` from the model, whether they came from the cache).

    The cache is keyed by the model, `kind` and the texts themselves: other texts or another
    model are embedded afresh."""
    path = cache_path(cache_dir, model_label, kind, texts) if cache_dir else None
    if path is not None and path.exists():
        vectors = np.load(path)
        if vectors.shape[0] == len(texts):
            return vectors.astype(np.float32), True
        logger.warning("ignoring %s: %d vectors for %d texts", path, vectors.shape[0], len(texts))
    encode = service.encode_documents if kind == "documents" else service.encode_queries
    vectors = normalise(np.asarray(encode(texts), dtype=np.float32))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return vectors, False


# --- deriving rows from base vectors ----------------------------------------------------------

def neighbours(base, k=NEIGHBOURS):
    """Indices of each base vector's `k` nearest other base vectors (fewer in a smaller base), nearest first."""
    count = len(base)
    k = min(k, count - 1)
    near = np.empty((count, k), dtype=np.int64)
    for start in range(0, count, 4096):
        similarity = base[start:start + 4096] @ base.T
        rows = np.arange(similarity.shape[0])
        similarity[rows, start + rows] = -np.inf  # not itself
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1)
        near[start:start + 4096] = np.take_along_axis(top, order, axis=1)
    return near


def origins(count, base_count, seed):
    """The base vector each of `count` rows derives from: every base vector equally often, shuffled."""
    order = np.arange(count) % base_count
    np.random.default_rng(seed).shuffle(order)
    return order


def derive(base, count, seed=0, spread=SPREAD, k=NEIGHBOURS):
    """`count` unit vectors derived from the unit vectors `base` (module docstring), float32."""
    if len(base) < MIN_BASE:
        raise ValueError(f"deriving vectors needs at least {MIN_BASE} base vectors, got {len(base)}")
    near = neighbours(base, k)
    rng = np.random.default_rng(seed + 1)
    rows = np.empty((count, base.shape[1]), dtype=np.float32)
    origin = origins(count, len(base), seed)
    for start in range(0, count, CHUNK):
        i = origin[start:start + CHUNK]
        weights = rng.standard_normal((len(i), near.shape[1]), dtype=np.float32) * (spread / np.sqrt(near.shape[1]))
        row = base[i] * (1.0 - weights.sum(axis=1, keepdims=True))
        for column in range(near.shape[1]):  # one neighbour at a time: a chunk's memory, not k chunks'
            row += weights[:, column:column + 1] * base[near[i, column]]
        rows[start:start + CHUNK] = normalise(row)
    return rows


def method():
    """The derivation's parameters, for the output."""
    return {"formula": "normalise(base[i] + spread / sqrt(m) * sum_k g_k * (base[n_k(i)] - base[i])), "
                       "g_k standard normal, n_k(i) the m nearest base vectors of i",
            "spread": SPREAD, "neighbours": NEIGHBOURS}
