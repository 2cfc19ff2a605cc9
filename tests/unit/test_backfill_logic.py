"""The backfill's encode step and bookkeeping, with fake encoders (no database, no model)."""
import numpy as np
import pytest

from segments.switch import backfill
from segments.switch.backfill import BackfillError, BackfillReport, ClaimedBatch, encode_batch, encode_texts
from embeddings.encoder import DimensionMismatch
from embeddings.fakes import HashingEncoder
from tests.embeddings.encoders import POISON_NAN, POISON_RAISE, BrokenEncoder, PoisonedEncoder


class FixedEncoder:
    """Returns the vectors it was built with, whatever the texts."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_documents(self, texts, texts_per_call=None):
        return self.vectors


def test_hashing_encoder_is_deterministic_unit_and_text_specific():
    encoder = HashingEncoder(dimensions=8)
    first, second, other = encoder.encode_documents(["steak", "steak", "eggs"])
    assert first.dtype == np.float32 and first.shape == (8,)
    assert np.array_equal(first, second)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(first @ other)) < 0.99
    assert encoder.encode_documents([]).shape == (0, 8)


def test_hashing_encoder_refuses_a_column_of_another_width():
    with pytest.raises(DimensionMismatch, match="384-dim vectors but segments.embedding holds 768"):
        HashingEncoder().check_dimensions("embedding", 768)


def test_a_nan_vector_is_rejected_and_the_rest_kept():
    texts = ["a", f"b {POISON_NAN}", "c"]
    vectors, reasons = encode_texts(PoisonedEncoder(dimensions=4), texts, 4)
    assert reasons == [None, "vector contains NaN or Inf", None]
    assert vectors[1] is None and vectors[0].shape == (4,)


@pytest.mark.parametrize("bad_row, reason", [
    ([1.0, np.inf, 0.0], "vector contains NaN or Inf"),
    ([0.0, 0.0, 0.0], "vector is all zeros"),
    ([1.0, 0.0], "vector has 2 values, expected 3"),
])
def test_bad_vectors_are_named(bad_row, reason):
    vectors, reasons = encode_texts(FixedEncoder([[1.0, 0.0, 0.0], bad_row]), ["good", "bad"], 3)
    assert reasons == [None, reason]


def test_a_batch_of_the_wrong_width_is_rejected_row_by_row():
    _, reasons = encode_texts(FixedEncoder(np.ones((2, 5), dtype=np.float32)), ["a", "b"], 3)
    assert reasons == ["vector has 5 values, expected 3"] * 2


def test_a_wrong_number_of_vectors_stops_the_run():
    with pytest.raises(BackfillError, match="returned 1 vectors for 2 texts"):
        encode_texts(FixedEncoder(np.ones((1, 3), dtype=np.float32)), ["a", "b"], 3)


def test_a_text_whose_encoding_raises_is_found_by_splitting_the_batch():
    encoder = PoisonedEncoder(dimensions=4)
    texts = [f"t{i}" for i in range(7)] + [f"x {POISON_RAISE}"] + [f"u{i}" for i in range(8)]
    batch = ClaimedBatch(claim_id=1, ids=list(range(100, 116)), texts=texts, md5s=[f"m{i}" for i in range(16)])
    encoded = encode_batch(encoder, batch, 4)
    assert encoded.failed == [(107, "m7", "encoding failed: ValueError: tokenizer exploded")]
    assert encoded.ids == [i for i in range(100, 116) if i != 107]
    assert encoded.vectors.shape == (15, 4)
    assert np.array_equal(encoded.vectors, HashingEncoder(4).encode_documents([t for t in texts if "POISON" not in t]))
    # bounded work: a split per level of a 16-row batch, not one encode per row
    assert encoder.calls.count("encode_documents") <= 2 * 5 + 1


def test_an_encoder_failing_on_everything_stops_the_run_without_quarantining():
    with pytest.raises(BackfillError, match="fails on every text .*device lost"):
        encode_texts(BrokenEncoder(dimensions=4), ["a", "b", "c"], 4)


def test_a_batch_that_fails_completely_yields_no_vectors():
    batch = ClaimedBatch(1, [5], [f"{POISON_RAISE}"], ["m"])
    encoded = encode_batch(PoisonedEncoder(dimensions=4), batch, 4)
    assert (encoded.ids, encoded.vectors.shape) == ([], (0, 4))
    assert encoded.failed == [(5, "m", "encoding failed: ValueError: tokenizer exploded")]


def test_backoff_grows_and_is_capped():
    delays = [backfill.backoff_seconds(attempt) for attempt in range(1, backfill.DB_ATTEMPTS)]
    assert delays == sorted(delays) and delays[0] == backfill.BACKOFF_FIRST_SECONDS
    assert max(delays) == backfill.BACKOFF_MAX_SECONDS
    assert sum(delays) < 60  # a dead database is reported within a minute


def test_report_as_dict_has_the_documented_keys():
    report = BackfillReport(column="embedding", rows_embedded=300, seconds=2.0)
    data = report.as_dict()
    assert {"rows_embedded", "rows_quarantined", "rows_remaining", "rows_blank", "seconds",
            "rows_per_second"} <= data.keys()
    assert data["rows_per_second"] == 150.0
    assert BackfillReport().rows_per_second == 0.0


def test_pending_predicate_is_the_todo_index_predicate():
    assert backfill.pending_sql("embedding_384") == "s.embedding_384 IS NULL AND NOT (s.text ~ '^[[:space:]]*$')"
