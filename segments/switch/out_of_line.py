"""Moving the values `segments` keeps out of line (in its TOAST table) to the front of that table.

A plain VACUUM gives disk space back only by truncating empty pages at the END of a file. Once
the contract has cleared the legacy vectors, the TOAST table is mostly dead chunks, but the
values still stored out of line are scattered through it: the new vectors of segments with
longer texts (the backfill wrote them into the gaps the legacy chunks left on every page), the
very long texts, whatever the application wrote meanwhile. Any one of them near the end keeps
the whole file at its size.

After a VACUUM, new chunks go to the lowest-numbered pages with room (VACUUM resets the free
space map's search pointer to encourage exactly that). So rewriting each out-of-line value with
a fresh copy of itself (same content: `text || ''`, a round trip through text for other types)
stores it again near the start, and the next VACUUM frees its old chunks and truncates the rest.
The staleness trigger does not fire (the text does not change); a rewritten row whose indexed
columns are binary-different (a vector or text that was out of line) gets new index entries,
and pgvector's HNSW index adds the row to the existing element of an identical vector.
"""
from askdrchaffee.postgres import quote_ident
from segments.schema import TABLE

TOAST_CHUNK_ID_SINCE = 170000  # pg_column_toast_chunk_id (PostgreSQL 17)
CONCATENATED = {"text": "''", "varchar": "''", "bytea": "''::bytea"}  # types whose `x || empty` is x


def columns_query():
    """(SQL, parameters): rows (name, type as SQL, type name, server_version_num) of each column of
    `segments` that can hold an out-of-line value (a varlena whose storage allows it)."""
    return """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname,
               current_setting('server_version_num')::int FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attlen = -1 AND a.attstorage <> 'p'
        ORDER BY a.attnum
        """, [TABLE]


def fresh_sql(name, type_sql, type_name):
    """An expression equal to column `name` that is a new value (not the stored TOAST pointer)."""
    column = quote_ident(name)
    if type_name in CONCATENATED:
        return f"({column} || {CONCATENATED[type_name]})"
    return f"CAST(CAST({column} AS text) AS {type_sql})"


def stored_out_of_line_sql(name, type_sql, type_name, server_version):
    """True where column `name` of the row is stored in the TOAST table.

    Before PostgreSQL 17 it compares sizes: a value stored out of line reports its size without
    its 4-byte header, at least 4 bytes less than a fresh copy of it (which has that header; a
    short value held inline has a 1-byte one, 3 bytes less). Compressed values held inline are
    smaller too, and are rewritten as well, which costs a little and changes nothing.
    """
    column = quote_ident(name)
    if server_version >= TOAST_CHUNK_ID_SINCE:
        return f"pg_column_toast_chunk_id({column}) IS NOT NULL"
    return f"pg_column_size({column}) + 4 <= pg_column_size({fresh_sql(name, type_sql, type_name)})"


class Rewrite:
    """The SQL that finds the rows holding out-of-line values and rewrites those values."""

    def __init__(self, cursor, skip=(), rows=None, server_version=None):
        """From the table's columns as columns_query() reads them (on `cursor`, or `rows` read already);
        `server_version` (server_version_num) instead of the server's."""
        if rows is None:
            cursor.execute(*columns_query())
            rows = cursor.fetchall()
        kept = [row for row in rows if row[0] not in skip]
        found = [tuple(row[:3]) for row in kept]
        tests = [stored_out_of_line_sql(*row[:3], server_version or row[3]) for row in kept]
        self.where = " OR ".join(f"({test})" for test in tests) or "false"
        self.sizes = [f"CASE WHEN {test} THEN pg_column_size({quote_ident(column[0])}) ELSE 0 END"
                      for column, test in zip(found, tests)]
        self.assignments = ", ".join(
            f"{quote_ident(column[0])} = CASE WHEN {test} THEN {fresh_sql(*column)} "
            f"ELSE {quote_ident(column[0])} END"
            for column, test in zip(found, tests)
        )

    def stored_query(self):
        """SQL of one row (rows holding values stored out of line, those values' bytes as stored: compressed
        where they are), in one scan of the table."""
        if not self.sizes:
            return "SELECT 0, 0"
        total = f"coalesce(sum({' + '.join(self.sizes)}), 0)::bigint"
        return f"SELECT count(*), {total} FROM {TABLE} WHERE {self.where}"

    def batch_statement(self, size):
        """One rewriting transaction, for the server's loop (server_loop.batches): the out-of-line values of
        the next `size` rows holding any after id $1 rewritten; its answer (rows rewritten, the last id;
        NULL when none was left). None when no column can hold a value out of line."""
        if not self.assignments:
            return None
        return f"""
            WITH moved AS (UPDATE {TABLE} s SET {self.assignments}
                           FROM (SELECT id FROM {TABLE} WHERE id > $1 AND ({self.where}) ORDER BY id LIMIT {int(size)}) AS batch
                           WHERE s.id = batch.id RETURNING s.id)
            SELECT count(*), max(id) FROM moved
        """
