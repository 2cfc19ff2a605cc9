"""Several claims encoded in one call are handed back claim by claim, each with its own failures."""
import uuid

import numpy as np

from embeddings.fakes import HashingEncoder
from segments.switch.backfill.encode import ClaimedBatch, RawBatch, checked, encode_batches, encode_claims
from tests.embeddings.encoders import POISON_NAN, POISON_RAISE, PoisonedEncoder, RecordingEncoder


def claim(claim_id, texts, first_id):
    ids = list(range(first_id, first_id + len(texts)))
    return ClaimedBatch(claim_id, ids, list(texts), [uuid.uuid4() for _ in texts])


def test_one_call_for_all_claims_and_each_gets_its_own_vectors():
    encoder = RecordingEncoder(dimensions=8)
    batches = [claim(1, ["a", "b"], 10), claim(2, ["c"], 20), claim(3, ["d", "e", "f"], 30)]
    encoded = encode_batches(encoder, batches, 8)
    assert encoder.calls == ["encode_documents"] and encoder.encoded == list("abcdef")
    assert [batch.claim_id for batch in encoded] == [1, 2, 3]
    assert [batch.ids for batch in encoded] == [[10, 11], [20], [30, 31, 32]]
    np.testing.assert_array_equal(encoded[2].vectors, HashingEncoder(8).encode_documents(["d", "e", "f"]))


def test_a_bad_vector_is_failed_in_its_own_claim_only():
    batches = [claim(1, ["a", f"b {POISON_NAN}"], 10), claim(2, ["c"], 20)]
    first, second = encode_batches(PoisonedEncoder(dimensions=4), batches, 4)
    assert first.ids == [10] and [(i, reason) for i, _, reason in first.failed] == [(11, "vector contains NaN or Inf")]
    assert second.ids == [20] and second.failed == []


def test_the_engine_encodes_a_window_once_and_each_writer_checks_its_claim():
    encoder = PoisonedEncoder(dimensions=4)
    batches = [claim(1, ["a", f"b {POISON_NAN}"], 10), claim(2, ["c"], 20)]
    raw = encode_claims(encoder, batches, 4)
    assert encoder.calls == ["encode_documents"] and all(isinstance(item, RawBatch) for item in raw)
    first, second = (checked(item, 4) for item in raw)
    assert first.ids == [10] and first.failed[0][2] == "vector contains NaN or Inf"
    assert second.ids == [20] and checked(second, 4) is second


def test_a_window_whose_encoding_raises_is_split_to_find_the_failing_text():
    batches = [claim(1, ["a", f"b {POISON_RAISE}"], 10), claim(2, ["c", "d"], 20)]
    first, second = encode_claims(PoisonedEncoder(dimensions=4), batches, 4)
    assert first.ids == [10] and first.failed[0][0] == 11 and "tokenizer exploded" in first.failed[0][2]
    assert second.ids == [20, 21] and second.failed == []
