"""Hand-checkable vectors for the search tests."""
import numpy as np

DIMS = 384


def vec(*components):
    """A 384-dim unit vector whose first components are `components` (the rest zero)."""
    padded = np.zeros(DIMS, dtype=np.float32)
    padded[: len(components)] = components
    return padded / np.linalg.norm(padded)


class MappedEncoder:
    """Embeds each known query as the vector the test chose for it."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_query(self, query):
        return self.vectors[query]
