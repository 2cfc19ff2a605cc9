"""The encode step: a claimed batch's texts to checked float32 vectors.

A vector with NaN or Inf, of the wrong size, or all zeros, and a text whose encoding raises
(the batch is split to find it), get a reason instead of a vector; the rest of the batch goes on.

The engine hands the windows of claims, as they come, to the encoder's stream (`encode_windows`,
embeddings/stream.py: the device goes from one window's texts to the next without waiting at the
boundary; an encoder without one encodes a window a call, `encode_claims`), and leaves the checking
of each claim's vectors to the thread that writes it (`checked`).
"""
from dataclasses import dataclass, field

import numpy as np

from .report import BackfillError

CANARY_TEXT = "A short sentence the model can always encode."
NOT_FINITE = "vector contains NaN or Inf"
ALL_ZEROS = "vector is all zeros"


@dataclass
class ClaimedBatch:
    """Segments claimed for this worker: their ids, texts and the md5s of those texts."""

    claim_id: int
    ids: list
    texts: list
    md5s: list


@dataclass
class EncodedBatch:
    """A ClaimedBatch encoded: the rows to write, and the rows to quarantine."""

    claim_id: int
    ids: list  # rows with a good vector, in the order of `vectors`
    md5s: list
    vectors: np.ndarray
    failed: list = field(default_factory=list)  # (id, md5, reason)


@dataclass
class RawBatch:
    """A ClaimedBatch's vectors as the encoder returned them, not yet checked."""

    batch: ClaimedBatch
    vectors: object


def _check_count(vectors, count):
    if len(vectors) != count:
        raise BackfillError(f"The encoder returned {len(vectors)} vectors for {count} texts: it is broken.")


def check_vectors(vectors, count, dims):
    """(float32 vectors, indexable by row, None for a refused one; a reason or None per row) for
    an encoder's output. When every row is good the vectors are the (count, dims) array itself."""
    _check_count(vectors, count)
    if not (isinstance(vectors, np.ndarray) and vectors.ndim == 2 and vectors.shape[1] == dims):
        return _check_each(vectors, dims)
    array = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    nonzero = np.abs(array).max(axis=1, initial=0) > 0
    if finite.all() and nonzero.all():
        return array, [None] * count
    reasons = [_reason(fin, nz) for fin, nz in zip(finite, nonzero)]
    return [row if reason is None else None for row, reason in zip(array, reasons)], reasons


def _check_each(vectors, dims):
    """check_vectors for output that is not one (count, dims) array: row by row."""
    good, reasons = [], []
    for vector in vectors:
        row = np.asarray(vector, dtype=np.float32).reshape(-1)
        if row.size != dims:
            reason = f"vector has {row.size} values, expected {dims}"
        else:
            reason = _reason(np.isfinite(row).all(), row.any())
        good.append(None if reason else row)
        reasons.append(reason)
    return good, reasons


def _reason(finite, nonzero):
    """Why a vector of the right size is refused, or None."""
    if not finite:
        return NOT_FINITE
    return None if nonzero else ALL_ZEROS


def encode_texts(encoder, texts, dims, canary_checked=False):
    """Encode `texts`; a text whose encoding raises is found by splitting the batch.

    Returns (vectors, reasons) as in check_vectors. When a whole batch fails and so does a
    canary text, the encoder itself is broken: BackfillError, and nothing is quarantined.
    """
    try:
        return check_vectors(encoder.encode_documents(texts), len(texts), dims)
    except BackfillError:
        raise
    except Exception as exc:
        return _after_failure(encoder, texts, dims, exc, canary_checked)


def _after_failure(encoder, texts, dims, exc, canary_checked):
    """encode_texts' result for `texts`, whose encoding together raised `exc`."""
    if len(texts) == 1:
        return [None], [f"encoding failed: {type(exc).__name__}: {exc}"[:1000]]
    if not canary_checked:
        check_canary(encoder, exc)
    middle = len(texts) // 2
    left = encode_texts(encoder, texts[:middle], dims, True)
    right = encode_texts(encoder, texts[middle:], dims, True)
    return list(left[0]) + list(right[0]), left[1] + right[1]


def check_canary(encoder, batch_error):
    """After a whole batch failed: BackfillError if the encoder cannot encode even a plain text."""
    try:
        encoder.encode_documents([CANARY_TEXT])
    except Exception as exc:
        raise BackfillError(
            f"The encoder fails on every text ({type(batch_error).__name__}: {batch_error}); nothing "
            "was quarantined. Fix the model setup (EMBEDDING_MODEL, EMBEDDING_DEVICE) and run "
            "`manage.py backfill_embeddings` again."
        ) from exc


def encode_batch(encoder, batch, dims):
    """The EncodedBatch of a ClaimedBatch."""
    return encode_batches(encoder, [batch], dims)[0]


def encode_batches(encoder, batches, dims):
    """The EncodedBatch of each ClaimedBatch, from one encode call over all their texts.

    One call over several claims lets the encoder sort more texts by length (less padding) and
    fill larger device batches; the vectors are then handed back claim by claim.
    """
    texts = [text for batch in batches for text in batch.texts]
    vectors, reasons = encode_texts(encoder, texts, dims)
    return _split(batches, vectors, reasons, dims)


def encode_claims(encoder, batches, dims):
    """One encode call over the texts of `batches`: a RawBatch per claim, to be `checked` by the
    thread that writes it. When the call raises, the texts are encoded again in halves to find
    the failing ones, and the claims come back as EncodedBatches."""
    texts = [text for batch in batches for text in batch.texts]
    try:
        vectors = encoder.encode_documents(texts)
    except Exception as exc:
        return _after_a_window_failed(encoder, batches, texts, exc, dims)
    return _raw(batches, vectors, len(texts))


def encode_windows(encoder, windows, dims):
    """encode_claims() of each window of claimed batches of the iterable `windows`, in order, through
    the encoder's stream where it has one (embeddings.encoder.encode_items): the device goes from one
    window's texts to the next without waiting at the boundary. `windows` is read on a thread of the
    stream's, as claims arrive."""
    from embeddings.encoder import encode_items

    items = ((batches, [text for batch in batches for text in batch.texts]) for batches in windows)
    for done in encode_items(encoder, items):
        batches = done.key
        texts = [text for batch in batches for text in batch.texts]
        if done.error is not None:
            yield _after_a_window_failed(encoder, batches, texts, done.error, dims)
        else:
            yield _raw(batches, done.vectors, len(texts))


def _after_a_window_failed(encoder, batches, texts, exc, dims):
    """The EncodedBatches of a window whose encoding raised `exc`: its texts again in halves, to find the
    failing ones."""
    checked_vectors, reasons = _after_failure(encoder, texts, dims, exc, False)
    return _split(batches, checked_vectors, reasons, dims)


def _raw(batches, vectors, count):
    """A RawBatch per claim of `batches` from the vectors of all their texts."""
    _check_count(vectors, count)
    raw, start = [], 0
    for batch in batches:
        end = start + len(batch.texts)
        raw.append(RawBatch(batch, vectors[start:end]))
        start = end
    return raw


def checked(item, dims):
    """The EncodedBatch of a RawBatch (an EncodedBatch is returned as it is)."""
    if isinstance(item, EncodedBatch):
        return item
    vectors, reasons = check_vectors(item.vectors, len(item.batch.texts), dims)
    return _encoded(item.batch, vectors, reasons, dims)


def _split(batches, vectors, reasons, dims):
    """The EncodedBatch of each of `batches` from the checked vectors of all their texts."""
    encoded, start = [], 0
    for batch in batches:
        end = start + len(batch.texts)
        encoded.append(_encoded(batch, vectors[start:end], reasons[start:end], dims))
        start = end
    return encoded


def _encoded(batch, vectors, reasons, dims):
    """The EncodedBatch of `batch` given its texts' checked vectors and reasons."""
    if isinstance(vectors, np.ndarray):  # every vector good: no copy row by row
        return EncodedBatch(batch.claim_id, list(batch.ids), list(batch.md5s), vectors.reshape(len(batch.ids), dims))
    good = [i for i, reason in enumerate(reasons) if reason is None]
    return EncodedBatch(
        claim_id=batch.claim_id,
        ids=[batch.ids[i] for i in good],
        md5s=[batch.md5s[i] for i in good],
        vectors=np.array([vectors[i] for i in good], dtype=np.float32).reshape(len(good), dims),
        failed=[(batch.ids[i], batch.md5s[i], reason) for i, reason in enumerate(reasons) if reason is not None],
    )
