"""The legacy L2 IVFFlat index: the evidence that it serves no query, and dropping and rebuilding it.

The original project built `segments_embedding_idx` as IVFFlat with `vector_l2_ops`, while every
query it ran ordered by cosine distance (`<=>`): PostgreSQL never answers a cosine ORDER BY from
an L2 index, so the index serves no query. It is not free, though. In the expanded phase every
row the backfill writes is a non-HOT update (the pending-rows partial index references the new
column), which inserts into every index of the table: into this one, a 6 kB copy of the row's
1536-dim legacy vector, after computing its distance to every list centre. Measured here, that
is more than half of the backfill's database time (README, Performance).

Nothing here runs by itself: the operator decides, with `manage.py embedding_switch
drop-legacy-index --confirm` (and `rebuild-legacy-index` to undo it).

- `evidence(using)`: the index, found by access method (ivfflat), operator class
  (vector_l2_ops) and column (the legacy vectors' column at this phase), never by name; its
  definition and size; how often it was scanned (`pg_stat_user_indexes.idx_scan`) and since
  when the statistics count.
- `drop(using, stdout)`: records the index's exact definition (`pg_get_indexdef`) in a
  SwitchEvent("legacy-index-dropped"), then DROP INDEX CONCURRENTLY (reads and writes go on).
- `rebuild(using, stdout)`: CREATE INDEX CONCURRENTLY from the recorded definition, under what
  the migrations' builds run under (segments.operations.build_concurrently: maintenance_work_mem
  raised, and a build that waits for older transactions, saying for which, instead of giving up
  after lock_timeout and throwing the index away); records a
  SwitchEvent("legacy-index-rebuilt"). Build it after the backfill, or the backfill pays for
  it again.
"""
import json
import re
import time
from dataclasses import asdict, dataclass

from django.core.management.base import CommandError
from django.db import connections

from askdrchaffee import postgres
from askdrchaffee.postgres import quote_ident
from segments import index_build
from segments.models import SwitchEvent
from segments.operations import build_concurrently
from segments.schema import TABLE, embedding_schema

METHOD = "ivfflat"
OPCLASS = "vector_l2_ops"
DROPPED = "legacy-index-dropped"
REBUILT = "legacy-index-rebuilt"

_FIND = """
    SELECT n.nspname, c.relname, t.relname, a.attname, pg_get_indexdef(i.indexrelid), i.indisvalid,
           pg_relation_size(i.indexrelid)
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_class t ON t.oid = i.indrelid
    JOIN pg_am am ON am.oid = c.relam
    JOIN pg_opclass oc ON oc.oid = i.indclass[0]
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = to_regclass(%s) AND a.attname = %s AND i.indnatts = 1
      AND am.amname = %s AND oc.opcname = %s
    ORDER BY c.relname
"""
_USAGE = "SELECT to_jsonb(s) FROM pg_stat_user_indexes s WHERE s.indexrelid = %s::regclass"
_STATS_SINCE = """
    SELECT d.stats_reset, pg_postmaster_start_time() FROM pg_stat_database d WHERE d.datname = current_database()
"""


class LegacyIndexError(CommandError):
    """The legacy index could not be dropped or rebuilt; the message says why and what to do."""


@dataclass(frozen=True)
class LegacyIndex:
    schema: str
    name: str
    table: str
    column: str
    definition: str  # pg_get_indexdef: CREATE INDEX ... USING ivfflat (column) WITH (lists=...), as built
    valid: bool
    size_bytes: int

    @property
    def qualified_name(self):
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


def find(cursor, column, table=TABLE):
    """The IVFFlat vector_l2_ops indexes on `table`.`column` (`table` as search_path resolves it,
    or schema-qualified)."""
    cursor.execute(_FIND, [table, column, METHOD, OPCLASS])
    return [LegacyIndex(*row) for row in cursor.fetchall()]


def _usage(cursor, index):
    """How often `index` was scanned, from pg_stat_user_indexes (last_idx_scan on PostgreSQL 16+)."""
    cursor.execute(_USAGE, [index.qualified_name])
    row = cursor.fetchone()
    stats = (row[0] if row else None) or {}
    if isinstance(stats, str):
        stats = json.loads(stats)
    return {"idx_scan": stats.get("idx_scan"), "last_idx_scan": stats.get("last_idx_scan")}


def _iso(value):
    return value.isoformat() if value is not None else None


def evidence(using="default"):
    """What the operator needs to decide, as a JSON-serialisable dict.

    `indexes` lists each legacy L2 IVFFlat index (usually one, `segments_embedding_idx`) with its
    definition, size and scans. `stats_reset` is when this database's statistics were last reset
    (None: never since the cluster was created); `server_started` matters on PostgreSQL 14 and
    older, whose statistics start again at every server start.
    """
    column = embedding_schema(using).legacy_column
    with connections[using].cursor() as cursor:
        indexes = find(cursor, column) if column else []
        found = [{**asdict(index), **_usage(cursor, index)} for index in indexes]
        cursor.execute(_STATS_SINCE)
        stats_reset, started = cursor.fetchone()
    return {"column": column, "method": METHOD, "opclass": OPCLASS, "indexes": found,
            "stats_reset": _iso(stats_reset), "server_started": _iso(started)}


def describe(found):
    """Lines telling the operator what `evidence()` found."""
    if not found["indexes"]:
        return [f"No {METHOD} {OPCLASS} index on {TABLE}.{found['column']}."]
    since = found["stats_reset"] or f"the server's start ({found['server_started']}) or earlier"
    lines = []
    for index in found["indexes"]:
        scans = "never scanned" if not index["idx_scan"] else f"scanned {index['idx_scan']} time(s)"
        lines.append(f"{index['name']} on {index['table']}.{index['column']}: {index['size_bytes'] / 2**20:,.0f} MB, "
                     f"{scans} since {since}.")
        lines.append(f"  {index['definition']}")
    lines.append(f"An L2 index ({OPCLASS}) never serves a cosine (<=>) ORDER BY, and every row the backfill "
                 "writes inserts into it.")
    return lines


def _writer(stdout):
    """A `write(line)` callable for `stdout` (a stream, a callable, or None)."""
    if stdout is None:
        return lambda line: None
    return stdout if callable(stdout) else stdout.write


def _concurrently(using, statement, what, command):
    """Run a DROP INDEX CONCURRENTLY `statement` on a connection of its own (askdrchaffee.postgres.
    private_connection), under lock retries (it waits for the transactions using the table; nothing
    is lost by giving up, and an index a cancelled drop leaves INVALID is dropped by the next try)."""
    def attempt(lock_timeout):
        connection = postgres.private_connection(using, what, settings={"lock_timeout": lock_timeout},
                                                 application_name=f"embedding_switch {command}")
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    try:
        postgres.with_lock_retries(attempt, what=what, holders=lambda: _holders(using))
    except postgres.LockNotTaken as exc:
        raise LegacyIndexError(f"{exc} Run `manage.py embedding_switch {command}` again once it has finished.") from None


def _holders(using):
    with connections[using].cursor() as cursor:
        return postgres.lock_holders(cursor, TABLE)


def drop(using="default", stdout=None):
    """Drop every legacy L2 IVFFlat index, CONCURRENTLY; returns the LegacyIndex of each dropped.

    Each index's exact definition is recorded first, in a SwitchEvent(step="legacy-index-dropped")
    whose details are the LegacyIndex's fields plus its scans, so `rebuild()` can build it again.
    Reads and writes go on meanwhile. With no such index, it says so and changes nothing.
    """
    out = _writer(stdout)
    found = evidence(using)
    if not found["indexes"]:
        out(f"No {METHOD} {OPCLASS} index on {TABLE}.{found['column']}: nothing to drop.")
        return []
    dropped = []
    for details in found["indexes"]:
        index = LegacyIndex(**{name: details[name] for name in LegacyIndex.__dataclass_fields__})
        event = SwitchEvent.objects.using(using).create(
            step=DROPPED, details={**details, "stats_reset": found["stats_reset"]})
        try:
            _concurrently(using, f"DROP INDEX CONCURRENTLY IF EXISTS {index.qualified_name}",
                          f"Dropping {index.name}", "drop-legacy-index")
        except BaseException:
            event.delete()  # it is still there; a new run records it again
            raise
        out(f"Dropped {index.name} ({index.size_bytes / 2**20:,.0f} MB); its definition is recorded, and "
            "`manage.py embedding_switch rebuild-legacy-index` builds it again.")
        dropped.append(index)
    return dropped


def recorded_definition(using="default"):
    """The details of the last drop recorded, or None."""
    event = SwitchEvent.objects.using(using).filter(step=DROPPED).order_by("-at", "-id").first()
    return event.details if event is not None else None


def _for_column(definition, recorded_column, column):
    """`definition` with its key column renamed from `recorded_column` to `column` (the swap renames
    the legacy column to embedding_legacy and back)."""
    if recorded_column == column:
        return definition
    pattern = rf"(USING {METHOD} \()(?:{re.escape(recorded_column)}|{re.escape(quote_ident(recorded_column))})(?=[\s)])"
    return re.sub(pattern, lambda match: match.group(1) + quote_ident(column), definition, count=1)


def _concurrent(definition):
    """CREATE [UNIQUE] INDEX ... as CREATE [UNIQUE] INDEX CONCURRENTLY ..."""
    return re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", definition, count=1)


def rebuild(using="default", stdout=None):
    """Build the last dropped legacy index again, CONCURRENTLY, from its recorded definition.

    Returns the new LegacyIndex, or None when a valid one exists already (nothing is done). An
    INVALID one, left by an interrupted build, is dropped and built again. Raises
    LegacyIndexError when no drop is recorded or the legacy column is gone.
    """
    out = _writer(stdout)
    connection = connections[using]
    column = embedding_schema(using).legacy_column
    if column is None:
        raise LegacyIndexError(f"{TABLE} has no legacy vector column any more (the contract dropped it): there is "
                               "nothing to index.")
    with connection.cursor() as cursor:
        existing = find(cursor, column)
    if any(index.valid for index in existing):
        out(f"{existing[0].name} exists already: nothing to rebuild.")
        return None
    recorded = recorded_definition(using)
    if recorded is None:
        raise LegacyIndexError(
            f"No dropped legacy index is recorded (no SwitchEvent {DROPPED!r}): there is no definition to build "
            "it from. `manage.py embedding_switch drop-legacy-index` records one.")
    for index in existing:  # INVALID: an interrupted build
        _concurrently(using, f"DROP INDEX CONCURRENTLY IF EXISTS {index.qualified_name}",
                      f"Dropping the invalid {index.name}", "rebuild-legacy-index")
    definition = _for_column(recorded["definition"], recorded["column"], column)
    out(f"Building {recorded['name']} CONCURRENTLY (reads and writes go on): {definition}")
    started = time.perf_counter()
    # Like the migrations' builds: it waits for older transactions instead of throwing the build away.
    with connection.cursor() as cursor:
        plan = index_build.plan(cursor)
    build_concurrently(using, recorded["name"], _concurrent(definition), plan, out)
    seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        built = [index for index in find(cursor, column) if index.name == recorded["name"]][0]
    SwitchEvent.objects.using(using).create(step=REBUILT, details={**asdict(built), "seconds": round(seconds, 1)})
    out(f"Built {built.name} in {seconds:.1f} s ({built.size_bytes / 2**20:,.0f} MB).")
    return built


# The operator's steps, as `manage.py embedding_switch` runs them.

def drop_step(using="default", out=None, confirmed=False):
    """`embedding_switch drop-legacy-index [--confirm]`: the evidence; with --confirm, the drop."""
    from segments.switch.steps import StepRefused, StepResult

    found = evidence(using)
    if not found["indexes"]:
        return StepResult("drop-legacy-index", False, describe(found)[0] + " Nothing to drop.", found)
    if not confirmed:
        raise StepRefused("\n".join(describe(found)) + "\nNothing was dropped: run it again with --confirm to drop "
                          "it (CONCURRENTLY; rebuild-legacy-index builds it again from its recorded definition).")
    dropped = drop(using)  # silent: the step's message says it once
    names = ", ".join(f"{index.name} ({index.size_bytes / 2**20:,.0f} MB)" for index in dropped)
    return StepResult("drop-legacy-index", True, f"Dropped {names}; its definition is recorded, and "
                      "`manage.py embedding_switch rebuild-legacy-index` builds it again.",
                      {"dropped": [asdict(index) for index in dropped]})


def rebuild_step(using="default", out=None):
    """`embedding_switch rebuild-legacy-index`: build it again from its recorded definition."""
    from segments.switch.steps import StepResult

    built = rebuild(using, out)
    if built is None:
        return StepResult("rebuild-legacy-index", False, "The legacy index exists already: nothing to rebuild.")
    return StepResult("rebuild-legacy-index", True,
                      f"{built.name} is back; while it exists, every row the backfill writes pays for it.", asdict(built))
