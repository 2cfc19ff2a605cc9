"""How the new column stores its vectors: `vector` (float32) or `halfvec` (float16).

settings.EMBEDDING_STORAGE chooses the type when phase 1 creates the column; unset, it is
`halfvec` where the server's pgvector has it (0.7 and later) and `vector` on an older one (the
pre-flight says so). From then on the column's own type, read from the catalogue, decides
everything else: the HNSW index's operator class, the backfill's binary COPY format, the casts of
the queries. A halfvec holds each of the 384 dimensions in 2 bytes instead of 4 (776 bytes a vector
against 1,544; the legacy 1536-dim vector takes 6,152), at a rounding error (about 1e-3 relative)
far below what separates two neighbours in a search: the million-row search run measured equal
recall, a faster search and half the index (docs/benchmark.md).
"""
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

HALFVEC_SINCE = (0, 7, 0)  # the pgvector release that added halfvec


@dataclass(frozen=True)
class Storage:
    type_name: str  # the SQL type: vector or halfvec
    cosine_opclass: str  # the HNSW operator class of cosine distance (`<=>`) on it
    bytes_per_dimension: int

    def sql_type(self, dimensions):
        return f"{self.type_name}({int(dimensions)})"

    def value_bytes(self, dimensions):
        """Bytes of one stored value: a 4-byte varlena header, dim and unused (2 bytes each), the values."""
        return 8 + self.bytes_per_dimension * int(dimensions)


STORAGES = {
    "vector": Storage("vector", "vector_cosine_ops", 4),
    "halfvec": Storage("halfvec", "halfvec_cosine_ops", 2),
}
COSINE_OPCLASSES = tuple(storage.cosine_opclass for storage in STORAGES.values())


def storage_named(type_name):
    """The Storage of SQL type `type_name`; ImproperlyConfigured for any other."""
    try:
        return STORAGES[type_name]
    except KeyError:
        raise ImproperlyConfigured(
            f"EMBEDDING_STORAGE={type_name!r}: choose 'vector' (float32) or 'halfvec' (float16)."
        ) from None


def configured(connection=None):
    """The Storage phase 1 creates: settings.EMBEDDING_STORAGE when set; else halfvec where the
    pgvector of `connection` (Django's default connection when None) has it, vector where not."""
    chosen = getattr(settings, "EMBEDDING_STORAGE", None)
    if chosen:
        return storage_named(chosen)
    return STORAGES["halfvec" if has_halfvec(connection) else "vector"]


_halfvec = {}


def has_halfvec(connection=None):
    """Whether the server's pgvector (installed, or else the one it would install) has halfvec."""
    from django.db import connection as default_connection

    connection = connection or default_connection
    key = (connection.alias, connection.settings_dict.get("NAME"))
    if key not in _halfvec:
        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce((SELECT extversion FROM pg_extension WHERE extname = 'vector'), "
                           "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector'))")
            version = cursor.fetchone()[0]
        _halfvec[key] = version is not None and _version(version) >= HALFVEC_SINCE
    return _halfvec[key]


def _version(text):
    return tuple(int(part) for part in text.split(".") if part.isdigit())
