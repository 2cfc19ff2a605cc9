"""What the live `segments` table is made of, read from the catalogue: for the pre-flight check.

Plain facts, no judgement (segments/switch/preflight.py judges them). Everything is found by
what it is, not by name: a real deployment's table was built by another project's history.
"""
from dataclasses import dataclass

from askdrchaffee import round_trips
from segments.schema import TABLE


@dataclass(frozen=True)
class Column:
    name: str
    type_name: str  # pg_type.typname: int4, varchar, vector, _float8, ...
    type_sql: str  # format_type(): integer, character varying(20), vector(1536), double precision[]
    not_null: bool
    default: str | None
    identity: bool


@dataclass(frozen=True)
class Index:
    name: str
    method: str  # btree, gin, ivfflat, hnsw, ...
    columns: tuple  # key column names; None for an expression
    opclasses: tuple
    primary: bool
    unique: bool
    partial: bool
    valid: bool
    scans: int  # pg_stat_user_indexes.idx_scan
    definition: str


@dataclass(frozen=True)
class Dependent:
    """A view, materialized view or rule built on `segments` (not a rule of segments itself)."""

    name: str
    kind: str  # "view", "materialized view" or "rule"
    columns: tuple  # the columns of segments it uses, by their current names
    whole_row: bool  # it uses the whole row (all columns, present and future)
    has_dependents: bool  # other views or rules are built on it


@dataclass(frozen=True)
class Rule:
    name: str
    definition: str


def table_exists(cursor):
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [TABLE])
    return cursor.fetchone()[0]


COLUMNS = """
    SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_get_expr(d.adbin, d.adrelid), a.attidentity <> ''
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
"""


INDEXES = """
    SELECT c.relname, am.amname,
           ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
                 LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE k.n <= i.indnkeyatts ORDER BY k.n),
           ARRAY(SELECT oc.opcname::text FROM unnest(i.indclass::oid[]) WITH ORDINALITY k(opc, n)
                 JOIN pg_opclass oc ON oc.oid = k.opc ORDER BY k.n),
           i.indisprimary, i.indisunique, i.indpred IS NOT NULL, i.indisvalid,
           coalesce(s.idx_scan, 0), pg_get_indexdef(i.indexrelid)
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid
    WHERE i.indrelid = to_regclass(%s)
    ORDER BY c.relname
"""


def indexes_from(rows):
    """The Indexes of `segments`, with how often each was scanned, from the rows of INDEXES."""
    found = []
    for name, method, keys, opclasses, primary, unique, partial, valid, scans, definition in rows:
        key_columns = None if None in keys else tuple(keys)
        found.append(Index(name, method, key_columns, tuple(opclasses), primary, unique, partial, valid, scans,
                           definition))
    return found


# When this database's statistics (idx_scan) were last reset, to the minute (UTC); NULL if never.
STATS_RESET = ("SELECT to_char(stats_reset AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM pg_stat_database "
               "WHERE datname = current_database()")


def table_reads(cursor):
    """In one statement: (the Columns of `segments`, in table order; its Indexes (indexes_from); the
    versions: server_version_num, server_version, the installed pgvector version or None, the version
    the server could install or None; when this database's statistics were last reset (STATS_RESET))."""
    columns_rows, index_rows, (found_versions,), reset = round_trips.reads(
        cursor, (COLUMNS, [TABLE]), (INDEXES, [TABLE]), VERSIONS, STATS_RESET)
    return ([Column(*row) for row in columns_rows], indexes_from(index_rows), tuple(found_versions),
            reset[0][0] if reset else None)


def dependents(cursor):
    """The views, materialized views and rules of other relations built on `segments`."""
    cursor.execute(
        """
        SELECT format('%%I.%%I', n.nspname, v.relname) || CASE WHEN r.rulename = '_RETURN' THEN ''
                   ELSE format(' (rule %%I)', r.rulename) END,
               CASE WHEN r.rulename <> '_RETURN' THEN 'rule'
                    WHEN v.relkind = 'm' THEN 'materialized view' ELSE 'view' END,
               array_remove(array_agg(DISTINCT a.attname::text), NULL),
               bool_or(d.refobjsubid = 0 AND r.rulename = '_RETURN'),
               EXISTS (SELECT 1 FROM pg_depend d2 JOIN pg_rewrite r2 ON r2.oid = d2.objid
                       WHERE d2.classid = 'pg_rewrite'::regclass AND d2.refobjid = v.oid AND r2.ev_class <> v.oid)
        FROM pg_depend d
        JOIN pg_rewrite r ON r.oid = d.objid
        JOIN pg_class v ON v.oid = r.ev_class
        JOIN pg_namespace n ON n.oid = v.relnamespace
        LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid AND d.refobjsubid > 0
        WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
          AND d.refobjid = to_regclass(%s) AND r.ev_class <> d.refobjid
        GROUP BY n.nspname, v.relname, v.relkind, v.oid, r.rulename
        ORDER BY 1
        """,
        [TABLE],
    )
    return [Dependent(name, kind, tuple(sorted(cols)), bool(whole), bool(has_deps))
            for name, kind, cols, whole, has_deps in cursor.fetchall()]


def rules(cursor):
    """The rules of `segments` itself."""
    cursor.execute(
        "SELECT rulename, pg_get_ruledef(oid) FROM pg_rewrite WHERE ev_class = to_regclass(%s) "
        "AND rulename <> '_RETURN' ORDER BY rulename",
        [TABLE],
    )
    return [Rule(*row) for row in cursor.fetchall()]


VERSIONS = """
    SELECT current_setting('server_version_num')::int, current_setting('server_version'),
           (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
           (SELECT default_version FROM pg_available_extensions WHERE name = 'vector')
"""


def applied_migrations(cursor, app_label):
    """Names of `app_label`'s migrations recorded as applied; None if Django has not migrated here."""
    cursor.execute("SELECT to_regclass('django_migrations') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return None
    cursor.execute("SELECT name FROM django_migrations WHERE app = %s", [app_label])
    return {name for (name,) in cursor.fetchall()}


def alembic_revision(cursor):
    """The revision in `alembic_version` (the original project's migration history), if any."""
    cursor.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
    if not cursor.fetchone()[0]:
        return None
    cursor.execute("SELECT string_agg(version_num, ', ') FROM alembic_version")
    return cursor.fetchone()[0]


def array_width(cursor, column):
    """The length of the first non-NULL array in segments.`column` (one row read); None if none."""
    cursor.execute(f'SELECT array_length("{column}", 1) FROM {TABLE} WHERE "{column}" IS NOT NULL LIMIT 1')
    row = cursor.fetchone()
    return row[0] if row else None


def max_id(cursor):
    cursor.execute(f"SELECT max(id) FROM {TABLE}")
    return cursor.fetchone()[0]
