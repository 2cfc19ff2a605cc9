"""A deterministic encoder that costs (almost) nothing, for tests and for measuring the database.

`HashingEncoder` has the interface of EmbeddingsService (`encode_documents`, `encode_queries`,
`dimensions`, `check_dimensions`) but derives each vector from a hash of its text: the same
text always gives the same unit vector, different texts give unrelated ones. Its vectors mean
nothing for search; never backfill a real table with it.
"""
import hashlib

import numpy as np

from embeddings import ledger
from embeddings.encoder import DimensionMismatch, normalise


class HashingEncoder:
    """Unit float32 vectors from SHAKE-256 digests of the texts: no model, ~microseconds per text."""

    def __init__(self, dimensions=384):
        self.dimensions = int(dimensions)
        self.model_name = f"hashing-{self.dimensions}"

    def check_dimensions(self, column=None, column_dimensions=None):
        """Raise DimensionMismatch unless the column holds vectors of this encoder's width."""
        if column_dimensions is not None and column_dimensions != self.dimensions:
            raise DimensionMismatch(
                f"{self.model_name} produces {self.dimensions}-dim vectors but segments.{column} "
                f"holds {column_dimensions}: use HashingEncoder(dimensions={column_dimensions})."
            )

    def encode_documents(self, texts, texts_per_call=None):
        """float32 (n, dims) unit vectors, one per text, in order."""
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        digest_size = 2 * self.dimensions  # one int16 per component
        digests = b"".join(hashlib.shake_256(text.encode("utf-8")).digest(digest_size) for text in texts)
        raw = np.frombuffer(digests, dtype="<i2").reshape(len(texts), self.dimensions)
        return normalise(raw.astype(np.float32) + 0.5)  # +0.5: no component is ever zero

    def model_identity(self):
        """Its identity in the model ledger, from its own vectors of the probe texts (a subclass that
        counts, delays or poisons encode calls does not see these)."""
        vectors = HashingEncoder.encode_documents(self, list(ledger.PROBE_TEXTS))
        return ledger.ModelIdentity(self.model_name, self.dimensions,
                                    tuple(tuple(round(float(x), 5) for x in row) for row in vectors),
                                    "hash vectors, not a model's", True, "")

    def encode_queries(self, queries):
        return self.encode_documents(queries)

    def encode_query(self, query):
        return self.encode_documents([query])[0]
