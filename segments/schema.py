"""Which phase of the switch the live `segments` table is in, read from the catalogue.

The commands, the search and the admin work at every phase: they ask here which column holds
the 384-dim vectors (if any) instead of trusting the code's model, which describes the end state.

    legacy    embedding vector(1536)                         -> `manage.py migrate` (phase 1)
    expanded  embedding vector(1536) + embedding_384         -> backfill, index, verify, swap
    swapped   embedding vector(384) + embedding_legacy       -> the swap can still be reversed
    final     embedding vector(384)                          -> the legacy column is gone
"""
from dataclasses import dataclass

from django.db import connections

TABLE = "segments"

# A segment whose text is empty or only whitespace gets no vector: there is nothing to embed.
BLANK_TEXT_PATTERN = r"^[[:space:]]*$"


def blank_sql(alias="s"):
    """SQL that is true for a segment (table alias `alias`) whose text is blank."""
    return f"{alias}.text ~ '{BLANK_TEXT_PATTERN}'"


def pending_sql(column, alias="s"):
    """Segments needing a vector in `column`. Written exactly as the partial index `..._todo`
    is defined, so the planner answers it from that index."""
    return f"{alias}.{column} IS NULL AND NOT ({blank_sql(alias)})"


@dataclass(frozen=True)
class EmbeddingSchema:
    phase: str
    vector_column: str | None  # the new model's vectors: the backfill's target, the search's column
    vector_dimensions: int | None
    legacy_column: str | None  # the old model's vectors, while they exist
    legacy_dimensions: int | None
    vector_storage: str | None = None  # the new column's SQL type: vector or halfvec

    @property
    def storage(self):
        """The new column's Storage (segments/storage.py), or None before phase 1."""
        from segments.storage import storage_named

        return storage_named(self.vector_storage) if self.vector_storage else None

    @property
    def is_live(self):
        """True once the new vectors are the ones the application searches."""
        return self.phase in ("swapped", "final")


class SchemaNotReady(Exception):
    pass


def vector_column_types(using="default"):
    """{column name: (SQL type, dimensions)} of the `vector` and `halfvec` columns of `segments`."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            """
            SELECT a.attname, t.typname, a.atttypmod FROM pg_attribute a
            JOIN pg_type t ON t.oid = a.atttypid
            WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
              AND t.typname IN ('vector', 'halfvec')
            """,
            [TABLE],
        )
        return {name: (type_name, typmod if typmod > 0 else None) for name, type_name, typmod in cursor.fetchall()}


def vector_columns(using="default"):
    """{column name: dimensions} of the vector (and halfvec) columns of `segments`."""
    return {name: dims for name, (_, dims) in vector_column_types(using).items()}


def embedding_schema(using="default"):
    """The phase of the table, as an EmbeddingSchema; SchemaNotReady if there is no table."""
    types = vector_column_types(using)
    columns = {name: dims for name, (_, dims) in types.items()}
    if "embedding" not in columns:
        raise SchemaNotReady(
            f"The {TABLE} table or its embedding column does not exist: run `manage.py migrate`."
        )
    if "embedding_384" in columns:
        return EmbeddingSchema("expanded", "embedding_384", columns["embedding_384"], "embedding", columns["embedding"],
                               types["embedding_384"][0])
    if "embedding_legacy" in columns:
        return EmbeddingSchema("swapped", "embedding", columns["embedding"], "embedding_legacy",
                               columns["embedding_legacy"], types["embedding"][0])
    from segments.models import EMBEDDING_DIMENSIONS

    if columns["embedding"] == EMBEDDING_DIMENSIONS:
        return EmbeddingSchema("final", "embedding", columns["embedding"], None, None, types["embedding"][0])
    return EmbeddingSchema("legacy", None, None, "embedding", columns["embedding"])


def require_vector_column(using="default"):
    """The EmbeddingSchema, or SchemaNotReady naming the migration to apply."""
    schema = embedding_schema(using)
    if schema.vector_column is None:
        raise SchemaNotReady(
            f"{TABLE} has no 384-dim column yet (phase: legacy). Apply phase 1 first: "
            "`manage.py migrate`."
        )
    return schema
