"""The backfill with a real model (the packaged all-MiniLM-L6-v2): the vectors are the model's."""
import numpy as np
import pytest

from segments.switch.backfill import run_backfill
from tests.conftest import as_stored
from tests.embeddings.conftest import (
    add_segments, is_blank_in_postgres, segment_texts, sentences, stored_vectors, vector_column,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LONG = ("The carnivore diet study measured ketones, insulin and inflammation over a year. " * 1300)[:100_000]
ODD_INPUTS = {
    "empty": "",
    "whitespace": " \t\n\r\x0b\x0c ",
    "unicode spaces": "\u00a0\u3000\u2009",
    "100,000 characters": LONG,
    "emoji": "🥩🔥 steak and eggs 🍳 every single day 💪",
    "hebrew (right to left)": "הבשר הוא מזון מלא ומזין",
    "arabic (right to left)": "اللحم غذاء كامل ومغذٍ",
    "control characters": "line\x01one\x07bell\x1b[31mred\x7f tab\tend\x1f",
    "sql": "'); DROP TABLE segments; -- \\ %s %(x)s $$ E'\\x00'",
    "zero-width": "\u200b\u200d",
}


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_vectors_are_the_models(minilm):
    texts, vectors = segment_texts(), stored_vectors()
    ids = [i for i, text in texts.items() if not is_blank_in_postgres(text)]
    fresh = minilm.encode_documents([texts[i] for i in ids])
    column = vector_column()
    tolerance = 1e-6 if np.array_equal(as_stored(fresh, column), fresh) else 1e-3
    for segment_id, expected in zip(ids, fresh):
        assert vectors[segment_id] is not None, f"segment {segment_id} ({texts[segment_id][:40]!r}) has no vector"
        assert cosine(vectors[segment_id], expected) >= 0.999, texts[segment_id][:40]
        # unit length, as the column holds it: a halfvec rounds each value to float16, and a vector from
        # another batch may round a value the other way, so its norm is exact to float16's precision only
        assert np.linalg.norm(vectors[segment_id]) == pytest.approx(np.linalg.norm(as_stored(expected, column)), abs=tolerance)
    for segment_id in set(texts) - set(ids):
        assert vectors[segment_id] is None, f"blank segment {segment_id} got a vector"
    return ids


def test_every_segment_gets_the_vector_a_fresh_encode_of_its_text_gives(minilm):
    add_segments(sentences(120) + ["", "   "])
    report = run_backfill(minilm, batch_size=32)
    assert (report.rows_embedded, report.rows_blank, report.rows_remaining) == (120, 2, 0)
    assert len(assert_vectors_are_the_models(minilm)) == 120


def test_odd_inputs_are_embedded_or_left_blank_as_documented(minilm):
    ids = dict(zip(ODD_INPUTS, add_segments(ODD_INPUTS.values())))
    report = run_backfill(minilm, batch_size=4)
    assert report.rows_quarantined == 0 and report.rows_remaining == 0
    embedded = assert_vectors_are_the_models(minilm)
    assert ids["empty"] not in embedded and ids["whitespace"] not in embedded
    for name in ("100,000 characters", "emoji", "hebrew (right to left)", "control characters", "sql"):
        assert ids[name] in embedded, name
    assert segment_texts()[ids["sql"]] == ODD_INPUTS["sql"]  # stored and read back verbatim


def test_a_text_longer_than_the_model_limit_is_embedded_by_its_beginning(minilm):
    (segment_id,) = add_segments([LONG])
    run_backfill(minilm)
    beginning = minilm.encode_documents([LONG[:3000]])[0]  # already past the model's 256 tokens
    assert cosine(stored_vectors()[segment_id], beginning) >= 0.999
