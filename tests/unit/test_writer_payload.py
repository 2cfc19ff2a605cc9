"""The binary COPY payload, decoded by hand: PostgreSQL's framing and pgvector's vector format."""
import struct
import uuid

import numpy as np
import pytest

from embeddings.writer import COPY_HEADER, copy_payload

MD5 = uuid.UUID("0cc175b9-c0f1-b6a8-31c3-99e269772661")  # md5('a')


def decode(payload):
    """[(id, md5 bytes, [floats])] from a binary COPY payload of (int4, uuid, vector)."""
    assert payload.startswith(b"PGCOPY\n\xff\r\n\x00")
    offset, rows = len(COPY_HEADER), []
    while True:
        (fields,) = struct.unpack_from("!h", payload, offset)
        offset += 2
        if fields == -1:
            assert offset == len(payload)
            return rows
        assert fields == 3
        size, row_id = struct.unpack_from("!ii", payload, offset)
        assert size == 4
        offset += 8
        (size,) = struct.unpack_from("!i", payload, offset)
        md5 = payload[offset + 4: offset + 4 + size]
        offset += 4 + size
        size, dim, unused = struct.unpack_from("!ihh", payload, offset)
        assert (size, unused) == (4 + 4 * dim, 0)
        values = list(struct.unpack_from(f"!{dim}f", payload, offset + 8))
        offset += 4 + size
        rows.append((row_id, md5, values))


def test_three_rows_of_three_dims_decode_to_what_went_in():
    vectors = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.5, 0.25, 0.125]], dtype=np.float32)
    payload = copy_payload([7, 8, 2**31 - 1], [MD5, str(MD5), MD5.bytes], vectors)
    assert decode(payload) == [
        (7, MD5.bytes, [1.0, 0.0, 0.0]),
        (8, MD5.bytes, [pytest.approx(0.6, abs=1e-7), pytest.approx(0.8, abs=1e-7), 0.0]),
        (2**31 - 1, MD5.bytes, [-0.5, 0.25, 0.125]),
    ]


def test_float32_values_are_sent_bit_for_bit():
    vectors = np.random.default_rng(1).standard_normal((5, 384)).astype(np.float32)
    rows = decode(copy_payload(list(range(5)), [MD5] * 5, vectors))
    assert np.array_equal(np.array([values for _, _, values in rows], dtype=np.float32), vectors)


def test_an_empty_batch_is_a_header_and_a_trailer():
    assert decode(copy_payload([], [], np.empty((0, 3), dtype=np.float32))) == []


@pytest.mark.parametrize("ids, md5s, vectors, message", [
    ([1, 2], [MD5], np.zeros((2, 3)), "1 md5s"),
    ([1], [MD5], np.zeros(3), "2-D"),
])
def test_mismatched_inputs_are_refused(ids, md5s, vectors, message):
    with pytest.raises(ValueError, match=message):
        copy_payload(ids, md5s, vectors)
