"""Hand-checkable vectors for the search tests, and the model ledger's record of them."""
import numpy as np
from django.db import connection

from embeddings import ledger

DIMS = 384


def vec(*components):
    """A 384-dim unit vector whose first components are `components` (the rest zero)."""
    padded = np.zeros(DIMS, dtype=np.float32)
    padded[: len(components)] = components
    return padded / np.linalg.norm(padded)


# What the model ledger records for a column the tests fill by hand (as a writer records its model).
HAND_MADE = ledger.ModelIdentity("hand-made vectors", DIMS, (tuple(float(x) for x in vec(1)),),
                                 "vectors chosen by the test", True, "")


class MappedEncoder:
    """Embeds each known query as the vector the test chose for it."""

    def __init__(self, vectors):
        self.vectors = vectors

    def model_identity(self):
        return HAND_MADE

    def encode_query(self, query):
        return self.vectors[query]


def record_hand_made(column="embedding", storage="vector"):
    """Record the hand-made vectors as the model of segments.`column`."""
    with connection.cursor() as cursor:
        ledger.record(cursor, "segments", column, HAND_MADE, storage, "first write")
