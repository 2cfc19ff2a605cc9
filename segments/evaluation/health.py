"""Vectors that cannot serve a search, caught whatever the queries say:

- zero: a zero vector has no direction, so its cosine distance to anything is undefined;
- collapsed: nearly the same vector for every text. A model whose weights carry no meaning (randomly
  initialised) gives texts vectors within a few hundredths of a cosine distance of each other: the
  median distance between the vectors of two different texts is under COLLAPSED_DISTANCE (on the
  demo segments: MiniLM 0.77, MiniLM with CLS pooling 0.33; randomly initialised MiniLM 0.03), and a
  search ranks by rounding noise;
- duplicated: the same vector (cosine distance under DUPLICATE_DISTANCE) for different texts, on more
  than DUPLICATE_SHARE of the vectors and at least DUPLICATE_LEAST of them (a writer that stored one
  vector for many rows; one stale vector is verify_embeddings' `stale` check's to find).

Each is looked for in a sample of the column's vectors with their texts (`check`). Texts are compared
with case and spacing ignored: the same words twice rightly get the same vector.
"""
import numpy as np

COLLAPSED_DISTANCE = 0.05
DUPLICATE_DISTANCE = 1e-4
DUPLICATE_SHARE = 0.05
DUPLICATE_LEAST = 5
ZERO_NORM = 1e-6


def _normal(text):
    return " ".join(text.lower().split())


def check(matrix, texts, where):
    """{"vectors", "zero", "median_distance", "collapsed", "duplicated", "problems": [sentences]} of
    the float (n, dims) `matrix` whose rows are the vectors of `texts` (in `where`: "segments.embedding")."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1)
    zero = int(np.sum(norms < ZERO_NORM))
    live = norms >= ZERO_NORM
    vectors = matrix[live] / norms[live, None]
    kept = [_normal(text) for text, keep in zip(texts, live) if keep]
    distances, duplicated = _pairs(vectors, kept)
    median = float(np.median(distances)) if distances.size else None
    figures = {"vectors": len(texts), "zero": zero, "median_distance": median,
               "collapsed": median is not None and median < COLLAPSED_DISTANCE, "duplicated": duplicated,
               "problems": []}
    figures["problems"] = _problems(figures, where)
    return figures


def _pairs(vectors, texts):
    """(cosine distances of the pairs of different texts, how many vectors equal another text's)."""
    if len(vectors) < 2:
        return np.empty(0), 0
    distances = 1.0 - vectors @ vectors.T
    codes = {text: number for number, text in enumerate(dict.fromkeys(texts))}
    labels = np.array([codes[text] for text in texts])
    different = labels[:, None] != labels[None, :]
    upper = np.triu(np.ones_like(different, dtype=bool), 1)
    duplicated = int(np.sum(np.any((distances < DUPLICATE_DISTANCE) & different, axis=1)))
    return distances[different & upper], duplicated


def _problems(figures, where):
    problems = []
    n = figures["vectors"]
    if figures["zero"]:
        problems.append(f"{figures['zero']} of {n} sampled vectors in {where} are zero: they have no "
                        "direction, and no cosine search can rank them.")
    if figures["collapsed"]:
        problems.append(f"{where}'s vectors are collapsed: the median cosine distance between the vectors "
                        f"of two different texts is {figures['median_distance']:.4f} (under {COLLAPSED_DISTANCE}), so "
                        "the model gives every text nearly the same vector and a search ranks by rounding noise.")
    if figures["duplicated"] >= DUPLICATE_LEAST and figures["duplicated"] > DUPLICATE_SHARE * n:
        problems.append(f"{figures['duplicated']} of {n} sampled vectors in {where} are the same vector as "
                        "another, different text's: they were not computed from their own texts.")
    return problems
