"""What the catalogue says about `segments`: the indexes on a column, the views that use it.

Found by what they are, never by name: a real deployment's table was built by another project's
history, and its index and view names are its own.
"""
from dataclasses import dataclass

from askdrchaffee.postgres import quote_ident, quote_literal
from segments.schema import TABLE


@dataclass(frozen=True)
class Index:
    name: str
    method: str  # btree, ivfflat, hnsw, ...
    opclass: str
    valid: bool
    definition: str


@dataclass(frozen=True)
class View:
    name: str  # schema-qualified and quoted, ready for SQL
    kind: str  # "view" or "materialized view"
    definition: str  # pg_get_viewdef: the SELECT, with columns by their current names
    owner: str
    options: list  # reloptions (security_barrier, check_option, ...)
    comment: str | None
    grants: list  # (grantee or PUBLIC, privilege, grantable)
    has_dependents: bool  # other views or rules are built on this view


_COLUMN_INDEXES = """
    SELECT c.relname, am.amname, oc.opcname, i.indisvalid, pg_get_indexdef(i.indexrelid)
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    JOIN pg_opclass oc ON oc.oid = i.indclass[0]
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass(%s) AND a.attname = %s
    ORDER BY c.relname
"""


def column_indexes_query(column):
    """(SQL, parameters) of column_indexes(), for a message of several reads (askdrchaffee.round_trips.reads)."""
    return _COLUMN_INDEXES, [TABLE, column]


def column_indexes(cursor, column):
    """The indexes whose first key is segments.`column`."""
    cursor.execute(*column_indexes_query(column))
    return [Index(*row) for row in cursor.fetchall()]


_DEPENDENT_VIEWS = """
    SELECT DISTINCT v.oid, format('%%I.%%I', n.nspname, v.relname),
           CASE v.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END,
           pg_get_viewdef(v.oid), pg_get_userbyid(v.relowner), coalesce(v.reloptions, '{}'),
           obj_description(v.oid, 'pg_class'),
           EXISTS (SELECT 1 FROM pg_depend d2 JOIN pg_rewrite r2 ON r2.oid = d2.objid
                   WHERE d2.refobjid = v.oid AND d2.classid = 'pg_rewrite'::regclass AND r2.ev_class <> v.oid)
    FROM pg_depend d
    JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_class v ON v.oid = r.ev_class
    JOIN pg_namespace n ON n.oid = v.relnamespace
    JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
    WHERE d.refobjid = to_regclass(%s) AND a.attname = %s AND v.oid <> d.refobjid
    ORDER BY 2
"""

_GRANTS = """
    SELECT coalesce(quote_ident(r.rolname), 'PUBLIC'), g.privilege_type, g.is_grantable
    FROM pg_class c, aclexplode(c.relacl) g LEFT JOIN pg_roles r ON r.oid = g.grantee
    WHERE c.oid = %s AND g.grantee <> c.relowner
"""


def dependent_views_query(column):
    """(SQL, parameters) of the views that use segments.`column`: rows (oid, name, kind, definition, owner,
    options, comment, has_dependents), for a message of several reads (askdrchaffee.round_trips.reads)."""
    return _DEPENDENT_VIEWS, [TABLE, column]


def dependent_views(cursor, column):
    """The views (and materialized views) that use segments.`column`."""
    cursor.execute(_DEPENDENT_VIEWS, [TABLE, column])
    views = []
    for oid, name, kind, definition, owner, options, comment, has_dependents in cursor.fetchall():
        cursor.execute(_GRANTS, [oid])
        views.append(View(name, kind, definition, owner, list(options), comment, cursor.fetchall(), has_dependents))
    return views


def recreate_view_sql(view):
    """Statements that create `view` again from its definition (after DROP VIEW), binding its
    columns by name again, with its options, owner, comment and grants."""
    options = f" WITH ({', '.join(view.options)})" if view.options else ""
    statements = [
        f"CREATE VIEW {view.name}{options} AS {view.definition.rstrip().rstrip(';')}",
        f"ALTER VIEW {view.name} OWNER TO {quote_ident(view.owner)}",
    ]
    if view.comment is not None:
        statements.append(f"COMMENT ON VIEW {view.name} IS {quote_literal(view.comment)}")
    for grantee, privilege, grantable in view.grants:
        statements.append(f"GRANT {privilege} ON {view.name} TO {grantee}{' WITH GRANT OPTION' if grantable else ''}")
    return statements
