"""VectorWriter against the real PostgreSQL: exact values, the stale-text guard, transactions."""
import hashlib
import uuid

import numpy as np
import pytest
from django.db import connection, transaction

from embeddings.ledger import ModelIdentity
from embeddings.writer import VectorWriter
from tests.conftest import as_stored
from tests.embeddings.conftest import add_segments, stored_vectors

# What the model ledger records for the vectors these tests write by hand.
HAND_MADE = ModelIdentity("hand-made 3-dim vectors", 3, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
HAND_MADE_384 = ModelIdentity("hand-made 384-dim vectors", 384, (tuple([1.0] + [0.0] * 383),))

pytestmark = pytest.mark.django_db


def md5(text):
    return uuid.UUID(hashlib.md5(text.encode()).hexdigest())


@pytest.fixture
def scratch():
    """A 3-dim table shaped like segments, to check values by hand."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE writer_scratch (id int4 PRIMARY KEY, text text NOT NULL, v vector(3))")
        cursor.execute("INSERT INTO writer_scratch VALUES (1, 'one', NULL), (2, 'two', NULL), (3, 'three', NULL)")
    return "writer_scratch"


def scratch_vectors():
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, v::text FROM writer_scratch ORDER BY id")
        return dict(cursor.fetchall())


def test_three_dim_vectors_land_exactly(scratch):
    writer = VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE)
    written = writer.write([1, 3], [md5("one"), md5("three")], [[1, 0, 0], [0.5, -0.25, 0.125]])
    assert written == 2
    assert scratch_vectors() == {1: "[1,0,0]", 2: None, 3: "[0.5,-0.25,0.125]"}


def test_384_dim_float32_values_round_trip_exactly():
    ids = add_segments(["first text", "second text"])
    vectors = np.random.default_rng(7).standard_normal((2, 384)).astype(np.float32)
    with transaction.atomic():
        assert VectorWriter(connection, "embedding", 384, identity=HAND_MADE_384).write(ids, [md5("first text"), md5("second text")],
                                                                 vectors) == 2
    stored, expected = stored_vectors(), as_stored(vectors)  # exactly, or exactly float16's rounding in a halfvec
    assert np.array_equal(stored[ids[0]], expected[0]) and np.array_equal(stored[ids[1]], expected[1])


def test_a_vector_for_an_older_text_is_not_written(scratch):
    with connection.cursor() as cursor:
        cursor.execute("UPDATE writer_scratch SET text = 'TWO (edited)' WHERE id = 2")
    written = VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE).write([1, 2], [md5("one"), md5("two")],
                                                                     [[1, 0, 0], [0, 1, 0]])
    assert written == 1
    assert scratch_vectors() == {1: "[1,0,0]", 2: None, 3: None}


def test_a_present_vector_is_kept_unless_overwrite(scratch):
    VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE).write([1], [md5("one")], [[1, 0, 0]])
    assert VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE).write([1], [md5("one")], [[0, 1, 0]]) == 0
    assert scratch_vectors()[1] == "[1,0,0]"
    assert VectorWriter(connection, "v", 3, table=scratch, overwrite=True, identity=HAND_MADE).write([1], [md5("one")], [[0, 1, 0]]) == 1
    assert scratch_vectors()[1] == "[0,1,0]"


def test_a_write_inside_the_callers_transaction_rolls_back_with_it(scratch):
    writer = VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE)
    with transaction.atomic():
        writer.write([1], [md5("one")], [[1, 0, 0]])
        transaction.set_rollback(True)
    assert scratch_vectors()[1] is None


def test_consecutive_batches_do_not_see_each_others_staged_rows(scratch):
    writer = VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE)
    with transaction.atomic():
        assert writer.write([1], [md5("one")], [[1, 0, 0]]) == 1
    with transaction.atomic():
        assert writer.write([2], [md5("two")], [[0, 1, 0]]) == 1
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {writer.staging_table}")
            assert cursor.fetchone()[0] == 1


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_a_write_is_its_own_transaction(scratch):
    assert connection.get_autocommit()
    assert VectorWriter(connection, "v", 3, table=scratch, identity=HAND_MADE).write([2], [md5("two")], [[0, 0, 1]]) == 1
    assert scratch_vectors()[2] == "[0,0,1]"
