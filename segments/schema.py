"""The `segments` table's facts in one place: its name, the switch's column names, the blank and
pending predicates, the index parameters, and the phase the table is in, read from the catalogue.

The commands, the search and the admin work at every phase: they ask here which column holds
the new model's vectors (if any) instead of trusting the code's model, which describes the end
state. A switch moves the live column `embedding` from one model to the next:

    legacy    embedding (the original project's 1536-dim vectors)   -> `manage.py migrate` (phase 1)
    expanded  embedding + the next model's column                  -> backfill, index, verify, swap
    swapped   embedding (the next model's) + embedding_legacy      -> the swap can still be reversed
    final     embedding                                            -> done; the next switch starts here

The first switch named its next column `embedding_384` (migrations 0003-0007); every later switch
names it `embedding_next`, whatever the width, so that two models of one width never clash.
"""
from dataclasses import dataclass

from django.db import connections

from askdrchaffee import round_trips
from embeddings.ledger import EVIDENCE_ROWS

TABLE = "segments"
LIVE = "embedding"  # the column the application searches
FIRST_NEXT = "embedding_384"  # the next model's column in the first switch
NEXT = "embedding_next"  # the next model's column in every later switch
NEXT_COLUMNS = (FIRST_NEXT, NEXT)
PREVIOUS = "embedding_legacy"  # the replaced model's column, from the swap to the contract
FIRST_EXPAND = "0003_embedding_384"  # the migration that first expanded the table

# The original project's vectors: GTE-Qwen2-1.5B, 1536 dimensions.
LEGACY_DIMENSIONS = 1536

# HNSW build parameters (pgvector's defaults, documented in the README's runbook).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64

# A segment whose text is empty or only whitespace gets no vector: there is nothing to embed.
BLANK_TEXT_PATTERN = r"^[[:space:]]*$"


def blank_sql(alias="s"):
    """SQL that is true for a segment (table alias `alias`) whose text is blank."""
    return f"{alias}.text ~ '{BLANK_TEXT_PATTERN}'"


def pending_sql(column, alias="s"):
    """Segments needing a vector in `column`. Written exactly as the partial index `..._todo`
    is defined, so the planner answers it from that index."""
    return f"{alias}.{column} IS NULL AND NOT ({blank_sql(alias)})"


# Since when a pending segment (alias `s`, its segments_pending_since row `p` LEFT JOINed) has waited:
# its text's last change as the arrival trigger stamped it (migration 0009), else its creation.
WAITING_SINCE = "coalesce(p.since, s.created_at AT TIME ZONE 'UTC')"


@dataclass(frozen=True)
class EmbeddingSchema:
    phase: str
    vector_column: str | None  # the new model's vectors: the backfill's target, the search's column
    vector_dimensions: int | None
    legacy_column: str | None  # the old model's vectors, while they exist
    legacy_dimensions: int | None
    vector_storage: str | None = None  # the new column's SQL type: vector or halfvec
    legacy_storage: str | None = None  # the replaced column's SQL type

    @property
    def storage(self):
        """The new column's Storage (segments/storage.py), or None before phase 1."""
        from segments.storage import storage_named

        return storage_named(self.vector_storage) if self.vector_storage else None

    @property
    def is_live(self):
        """True once the new vectors are the ones the application searches."""
        return self.phase in ("swapped", "final")

    @property
    def compared(self):
        """(old, new): the columns of the two models the table holds now (expanded: the live column
        and the next one; swapped: the replaced one and the live one); None when it holds one model's."""
        if self.phase == "expanded":
            return LIVE, self.vector_column
        if self.phase == "swapped":
            return PREVIOUS, LIVE
        return None


class SchemaNotReady(Exception):
    pass


VECTOR_COLUMNS = """
    SELECT a.attname, t.typname, a.atttypmod FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
      AND t.typname IN ('vector', 'halfvec')
"""


def vector_column_types(using="default", cursor=None):
    """{column name: (SQL type, dimensions)} of the `vector` and `halfvec` columns of `segments`
    (through `cursor` when given: the table its search_path shows)."""
    if cursor is None:
        with connections[using].cursor() as cursor:
            return vector_column_types(cursor=cursor)
    cursor.execute(VECTOR_COLUMNS, [TABLE])
    return column_types(cursor.fetchall())


def column_types(rows):
    """vector_column_types() from the rows of VECTOR_COLUMNS (read by a caller with other reads)."""
    return {name: (type_name, typmod if typmod > 0 else None) for name, type_name, typmod in rows}


def vector_columns(using="default"):
    """{column name: dimensions} of the vector (and halfvec) columns of `segments`."""
    return {name: dims for name, (_, dims) in vector_column_types(using).items()}


def embedding_schema(using="default", cursor=None, types=None, recorded=None, expanded=None):
    """The phase of the table, as an EmbeddingSchema; SchemaNotReady if there is no table (through
    `cursor` when given; from `types`, vector_column_types() read already, and `recorded`, what
    MIGRATIONS_RECORDED answered, or `expanded`, what expanded_before() says, when given: without them,
    one statement reads the first two)."""
    if cursor is None:
        with connections[using].cursor() as cursor:
            return embedding_schema(cursor=cursor, types=types, recorded=recorded, expanded=expanded)
    if types is None:
        type_rows, ((recorded,),) = round_trips.reads(cursor, (VECTOR_COLUMNS, [TABLE]), MIGRATIONS_RECORDED)
        types = column_types(type_rows)
    columns = {name: dims for name, (_, dims) in types.items()}
    if LIVE not in columns:
        raise SchemaNotReady(
            f"The {TABLE} table or its embedding column does not exist: run `manage.py migrate`."
        )
    for next_column in NEXT_COLUMNS:
        if next_column in columns:
            return EmbeddingSchema("expanded", next_column, columns[next_column], LIVE, columns[LIVE],
                                   types[next_column][0], types[LIVE][0])
    if PREVIOUS in columns:
        return EmbeddingSchema("swapped", LIVE, columns[LIVE], PREVIOUS, columns[PREVIOUS], types[LIVE][0],
                               types[PREVIOUS][0])
    if expanded_before(cursor, recorded) if expanded is None else expanded:
        return EmbeddingSchema("final", LIVE, columns[LIVE], None, None, types[LIVE][0])
    return EmbeddingSchema("legacy", None, None, LIVE, columns[LIVE], None, types[LIVE][0])


MIGRATIONS_RECORDED = "SELECT to_regclass('django_migrations') IS NOT NULL"  # read with the columns
# Whether the table's first phase 1 is recorded (where django_migrations exists).
EXPANDED = f"SELECT EXISTS (SELECT 1 FROM django_migrations WHERE app = 'segments' AND name = '{FIRST_EXPAND}')"


def expanded_before(cursor, recorded=None):
    """Whether this project ever expanded the table (its first phase 1 is recorded as applied):
    with only `embedding` left, the table is then at the end of a switch, not the original one.
    `recorded`: MIGRATIONS_RECORDED's answer, when read already."""
    if recorded is None:
        cursor.execute(MIGRATIONS_RECORDED)
        recorded = cursor.fetchone()[0]
    if not recorded:
        return False
    cursor.execute(EXPANDED)
    return cursor.fetchone()[0]


def require_vector_column(using="default", cursor=None, types=None):
    """The EmbeddingSchema, or SchemaNotReady naming the migration to apply (`types`: as for embedding_schema)."""
    schema = embedding_schema(using, cursor, types)
    if schema.vector_column is None:
        raise SchemaNotReady(
            f"{TABLE} has no column for the new model yet (phase: legacy). Apply phase 1 first: "
            "`manage.py migrate`."
        )
    return schema


def stored_samples(cursor, column, rows=EVIDENCE_ROWS):
    """(text, stored vector) of a few segments that have a vector in `column`: the model ledger's evidence."""
    cursor.execute(f"SELECT s.text, s.{column}::real[] FROM {TABLE} s WHERE s.{column} IS NOT NULL LIMIT %s", [rows])
    return cursor.fetchall()
