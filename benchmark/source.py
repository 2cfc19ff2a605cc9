"""Where the benchmark's texts and rows come from: the user's own segments, topped up if needed.

- `sample_texts(n)`: texts for the encode and rerank suites, a random sample of the live table's
  non-blank segments; generated transcript-like text (segments/demo_data.py) when it has none.
- `fill_source(cursor, scratch, rows)`: the scratch table `source`, holding `rows` segments:
  the live table's first rows (vectors left out), then generated segments for the rest.
- `fill_legacy_source(...)` (shapes.py): a legacy 1536-dim vector for each row of `source`, for
  the live-shaped copies.
- `segments_copy(...)`: a working copy of `segments` in the scratch schema, of one of the shapes of
  shapes.py (by default the scratch shape: the live table's indexes without the vector indexes),
  filled from `source`.

The live table is only read.
"""
from dataclasses import dataclass

from django.db import connections

from benchmark import shapes
from benchmark.scratch import copy_table, drop_vector_indexes, own_id_sequence, quote
from segments import triggers
from segments.schema import BLANK_TEXT_PATTERN, FIRST_NEXT, embedding_schema

COPY_CHUNK = 20_000
# The new column's width where the live table has none yet: bge-small-en-v1.5's (the scratch
# copies add the column, as phase 1 would).
DIMENSIONS = 384


@dataclass(frozen=True)
class TextSample:
    texts: list
    source: str  # in words, for the output


@dataclass(frozen=True)
class VectorColumn:
    """The column the new model's vectors go to, as the live table's phase has it."""

    name: str
    dimensions: int
    in_live_table: bool  # False at the legacy phase: scratch copies add it, as phase 1 does


def vector_column(using="default"):
    schema = embedding_schema(using)
    if schema.vector_column is None:
        return VectorColumn(FIRST_NEXT, DIMENSIONS, False)
    return VectorColumn(schema.vector_column, schema.vector_dimensions or DIMENSIONS, True)


def sample_texts(n, seed=0, using="default"):
    """`n` texts: a sample of the live segments (repeated if there are fewer), else generated."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT setseed(%s)", [_unit_seed(seed)])
        cursor.execute(
            "SELECT text FROM public.segments WHERE text !~ %s ORDER BY random() LIMIT %s",
            [BLANK_TEXT_PATTERN, n],
        )
        texts = [text for (text,) in cursor.fetchall()]
    if not texts:
        from segments.demo_data import generate_texts

        return TextSample(generate_texts(n, seed), f"generated transcript-like text ({n} texts; the segments table is empty)")
    distinct = len(texts)
    texts = (texts * (n // distinct + 1))[:n]
    repeated = "" if distinct == n else f", repeated to {n}"
    return TextSample(texts, f"the segments table ({distinct} random segments{repeated})")


def _unit_seed(seed):
    return (seed % 1000) / 1000.0


def live_columns(cursor):
    """The live table's columns but its vector columns (`vector` and `halfvec`), in order."""
    cursor.execute(
        """
        SELECT a.attname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = 'public.segments'::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND t.typname NOT IN ('vector', 'halfvec')
        ORDER BY a.attnum
        """
    )
    return [name for (name,) in cursor.fetchall()]


@dataclass(frozen=True)
class Source:
    table: str  # quoted, qualified
    rows: int
    from_live: int
    generated: int

    @property
    def description(self):
        if not self.generated:
            return f"{self.rows:,} segments copied from the segments table"
        if not self.from_live:
            return f"{self.rows:,} generated transcript-like segments (the segments table is empty)"
        return f"{self.from_live:,} segments from the segments table + {self.generated:,} generated"


def fill_source(cursor, scratch, rows, seed=0):
    """Create and fill the scratch table `source` with `rows` segments; returns a Source."""
    from segments import demo_data

    table = scratch.table("source")
    cursor.execute(f"CREATE TABLE {table} (LIKE public.segments INCLUDING DEFAULTS)")
    cursor.execute("SELECT coalesce(max(id), 0) FROM public.segments")
    own_id_sequence(cursor, scratch, "source", start=cursor.fetchone()[0] + 1)
    columns = ", ".join(quote(name) for name in live_columns(cursor))
    cursor.execute(
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM public.segments ORDER BY id LIMIT %s", [rows]
    )
    from_live = cursor.rowcount
    generated = rows - from_live
    if generated:
        sql = f"COPY {table} ({', '.join(demo_data.COLUMNS)}) FROM STDIN WITH (FORMAT binary)"
        segments = demo_data.generate_segments(generated, seed)
        for start in range(0, generated, COPY_CHUNK):
            batch = [next(segments) for _ in range(min(COPY_CHUNK, generated - start))]
            cursor.cursor.copy_expert(sql, demo_data.copy_payload(batch))
    cursor.execute(f"ANALYZE {table}")
    return Source(table, rows, from_live, generated)


def segments_copy(cursor, scratch, source, name, rows, column, shape="scratch", legacy_source=None,
                  vector_sql=None):
    """Scratch table `name` of `shape` (shapes.SHAPES), holding `source`'s first `rows` rows.

    It has the live table's btree indexes and the vector column `column` (a VectorColumn),
    empty, or holding the SQL expression `vector_sql` (of the source row `s`) in every row. The
    live shapes also have the legacy column filled from `legacy_source` (the table
    shapes.fill_legacy_source made), the pending-rows partial index and, for `live`, the legacy
    IVFFlat index. A copy named `segments` (the one the engine finds through search_path) gets
    the staleness trigger. The table is vacuumed and a checkpoint taken (shapes.settle).
    """
    table = copy_table(cursor, scratch, "segments", name)
    drop_vector_indexes(cursor, table)
    cursor.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {source.table}")
    own_id_sequence(cursor, scratch, name, start=cursor.fetchone()[0])
    if not column.in_live_table:
        cursor.execute(f"ALTER TABLE {table} ADD COLUMN {quote(column.name)} vector({int(column.dimensions)})")
    columns = [quote(name) for name in live_columns(cursor)]
    values = [f"s.{name}" for name in columns]
    if vector_sql is not None:
        columns.append(quote(column.name))
        values.append(vector_sql)
    join = ""
    if shape != "scratch":
        legacy, dims = shapes.legacy_column(scratch.using)
        cursor.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {quote(legacy)} vector({int(dims)})")
        shapes.ensure_pending_index(cursor, table, name, column.name)
        if shape == "live":
            shapes.add_legacy_index(cursor, table, legacy)
        columns.append(quote(legacy))
        values.append("l.v")
        join = f" LEFT JOIN {legacy_source} l ON l.id = s.id"
    cursor.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(values)} FROM {source.table} s{join} "
                   "ORDER BY s.id LIMIT %s", [rows])
    if name == "segments":
        with scratch.searched_first(cursor):
            cursor.execute(triggers.create_sql(column.name))
    shapes.settle(cursor, table)
    return table
