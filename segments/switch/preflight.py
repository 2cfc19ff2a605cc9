"""The pre-flight check: the live `segments` table compared with what the project needs.

A real deployment's table was built by the original project's own history, not by migration
segments.0001: columns renamed or added, indexes under other names, a trigger and a view of
the application's own. `inspect()` reads the catalogue and says, for each difference, what it
found and what to do:

- ERROR: the project cannot serve the table as it is (`migrate` refuses phase 1, and
  `manage.py check --database default` fails), e.g. `embedding` stored as `double precision[]`,
  no `video_type`, a rule on `segments`, user triggers the switch may not keep quiet;
- WARNING: the switch will work, and something will behave differently than one may expect
  (a view that the swap re-points to the new column, an L2 vector index no query uses);
- INFO: a difference that needs nothing (renamed or extra columns, other index names).

No table at all is a fresh install: nothing to report. The same report is shown by the
system check (segments/checks.py) and by `migrate` before phase 1.
"""
import importlib
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.db import connections

from segments.schema import NEXT_COLUMNS, PREVIOUS, TABLE, SchemaNotReady, embedding_schema
from segments.storage import COSINE_OPCLASSES, HALFVEC_SINCE
from segments.switch import live_table, user_triggers

ERROR, WARNING, INFO = "error", "warning", "info"

# Every finding's code; a code's system-check id is its position here (segments.E004 is
# column_missing): append new codes, never reorder.
CODES = (
    "postgres_version", "pgvector_missing", "pgvector_version", "column_missing", "column_type",
    "primary_key", "embedding_type", "id_range", "legacy_columns", "extra_columns", "index_names",
    "index_missing", "vector_index", "view", "view_blocked", "rule", "trigger", "trigger_privilege",
    "not_adopted", "alembic", "storage",
)

MIN_POSTGRES = 130000
HNSW_SINCE, ITERATIVE_SCAN_SINCE = (0, 5, 0), (0, 8, 0)
NEW_COLUMNS = (*NEXT_COLUMNS, PREVIOUS)  # the switch's own, at one phase or another
RENAMED = {"speaker_confidence": "speaker_conf"}  # by the original project's revision 008
INT4_MAX = 2**31 - 1  # the switch's bookkeeping (claims, quarantine) stores segment ids as integer
COMPATIBLE_TYPES = {  # Django internal type: pg_type.typname values the project can read and write
    "AutoField": {"int4", "int8"},
    "BigAutoField": {"int4", "int8"},
    "CharField": {"varchar", "text"},
    "TextField": {"text", "varchar"},
    "FloatField": {"float8", "float4", "numeric"},
    "DateTimeField": {"timestamp", "timestamptz"},
}
DISTANCES = {"vector_l2_ops": "L2 (`<->`)", "vector_ip_ops": "inner-product (`<#>`)",
             "vector_l1_ops": "L1 (`<+>`)", "vector_cosine_ops": "cosine (`<=>`)"}


@dataclass(frozen=True)
class Finding:
    level: str  # ERROR (the project cannot serve the table), WARNING, INFO
    code: str  # one of CODES
    message: str  # what was found
    fix: str = ""  # what to do about it

    @property
    def number(self):
        """The code's number, as in the system check id (segments.E004)."""
        return CODES.index(self.code) + 1


@dataclass
class Report:
    findings: list = field(default_factory=list)

    @property
    def blocking(self):
        return [f for f in self.findings if f.level == ERROR]

    def as_text(self, only_blocking=False):
        shown = self.blocking if only_blocking else self.findings
        return "\n".join(f"  [{f.level}] {f.message}" + (f"\n      fix: {f.fix}" if f.fix else "") for f in shown)

    def as_dict(self):
        return {"blocking": len(self.blocking), "findings": [asdict(f) for f in self.findings]}


def inspect(using="default"):
    """The Report for the live table (no table yet: nothing to report), read on the caller's connection
    (the privileges it judges are its role's)."""
    with connections[using].cursor() as cursor:
        if not live_table.table_exists(cursor):
            return Report()
    schema = _schema(using)
    return report(schema, {name: part() for name, part in parts(using, schema).items()})


def parts(using="default", schema=None):
    """The pre-flight's reads, {name: callable}, independent of each other: `status` reads them side by
    side with its own (askdrchaffee.postgres.SideBySide); `report` judges what they read. `schema`: the
    table's EmbeddingSchema as the caller read it (None: no phase yet)."""
    def read(work):
        def part():
            with connections[using].cursor() as cursor:
                return work(cursor)
        return part

    return {
        "preflight table": read(lambda cursor: (_Table(cursor, connections[using], schema).findings(),)),
        "preflight dependents": read(lambda cursor: (live_table.dependents(cursor), live_table.rules(cursor))),
        "preflight triggers": read(lambda cursor: trigger_findings(cursor)),
        "preflight history": read(lambda cursor: (live_table.applied_migrations(cursor, "segments"),
                                                  live_table.alembic_revision(cursor))),
    }


def report(schema, read):
    """The Report of the pre-flight's reads (`parts`, run) for a table of EmbeddingSchema `schema` (None: no
    phase yet)."""
    phase = None if schema is None else schema.phase
    findings = [
        *read["preflight table"][0],
        *dependent_findings(*read["preflight dependents"], phase),
        *read["preflight triggers"],
        *history_findings(*read["preflight history"]),
    ]
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return Report(sorted(findings, key=lambda f: order[f.level]))


def _version(text):
    return tuple(int(part) for part in text.split(".") if part.isdigit()) if text else None


def version_findings(server_version_num, server_version, vector_version, vector_available):
    """What the PostgreSQL and pgvector versions allow."""
    found = []
    if server_version_num < MIN_POSTGRES:
        found.append(Finding(ERROR, "postgres_version", f"PostgreSQL {server_version}: the project needs 13 or later.",
                             "upgrade the server to PostgreSQL 13 or later (pg_upgrade)"))
    installed = _version(vector_version)
    if installed is None:
        fix = ("as a superuser, in this database: CREATE EXTENSION vector;" if vector_available else
               "install pgvector 0.8 or later on the server (packages are named postgresql-<version>-pgvector; "
               "see github.com/pgvector/pgvector), then, in this database: CREATE EXTENSION vector;")
        found.append(Finding(ERROR, "pgvector_missing", "The pgvector extension is not installed in this database "
                             "(`migrate --fake-initial` records migration 0001 without creating it).", fix))
        return found
    upgrade = ("install a newer pgvector on the server, then, in this database: ALTER EXTENSION vector UPDATE;"
               f" (the server offers {vector_available})")
    if installed < HNSW_SINCE:
        found.append(Finding(ERROR, "pgvector_version", f"pgvector {vector_version} has no HNSW index (0.5.0 or "
                             "later): the switch's index cannot be built.", upgrade))
    elif installed < ITERATIVE_SCAN_SINCE:
        halfvec = "" if installed >= HALFVEC_SINCE else " It has no halfvec type either (0.7.0 or later)."
        found.append(Finding(WARNING, "pgvector_version", f"pgvector {vector_version} has no iterative index scans "
                             "(0.8.0 or later): a search filtered by video, speaker or video type may return fewer "
                             f"results than asked for when the filter rejects most candidates.{halfvec}", upgrade))
    else:
        found.append(Finding(INFO, "pgvector_version", f"PostgreSQL {server_version} with pgvector {vector_version}: "
                             "HNSW, halfvec and iterative index scans are all available.", "nothing to do"))
    return found


class _Table:
    """The columns and indexes of the live table, judged against the Segment model."""

    def __init__(self, cursor, connection, schema):
        from segments.models import Segment

        self.cursor, self.connection, self.model = cursor, connection, Segment
        columns, self.indexes, self.versions, self.stats_reset = live_table.table_reads(cursor)  # one statement
        self.columns = {column.name: column for column in columns}
        self.schema = schema
        self.phase = None if schema is None else schema.phase

    def findings(self):
        """What the versions, the table's storage, its columns and its indexes call for."""
        return [
            *version_findings(*self.versions),
            *storage_findings(self.versions[2], self.schema),
            *self.column_findings(),
            *self.index_findings(self.stats_reset),
        ]

    # Columns.

    def column_findings(self):
        found = []
        mapped = self.model._meta.concrete_fields
        for model_field in mapped:
            column = self.columns.get(model_field.column)
            if model_field.primary_key:
                found += self._primary_key(model_field, column)
            elif model_field.column == "embedding":
                found += self._embedding(column)
            elif column is None:
                found.append(self._missing(model_field))
            else:
                found += self._type(model_field, column)
        found += self._unmapped({f.column for f in mapped})
        return found

    def _missing(self, model_field):
        with self.connection.schema_editor(collect_sql=True, atomic=False) as editor:
            definition, _ = editor.column_sql(self.model, model_field, include_default=True)
        definition = definition.removesuffix(" NULL")
        fix = f"ALTER TABLE {TABLE} ADD COLUMN {model_field.column} {definition}"
        if "NOT NULL" in definition and "DEFAULT" not in definition:
            fix = (f"ALTER TABLE {TABLE} ADD COLUMN {model_field.column} {definition.replace(' NOT NULL', '')}; "
                   f"fill it, then ALTER TABLE {TABLE} ALTER COLUMN {model_field.column} SET NOT NULL")
        return Finding(ERROR, "column_missing", f"{TABLE}.{model_field.column} is missing: the project reads and "
                       "writes it (the search filters and the admin show it).", fix)

    def _type(self, model_field, column):
        accepted = COMPATIBLE_TYPES.get(model_field.get_internal_type())
        if accepted is None or column.type_name in accepted:
            return []
        wanted = model_field.db_type(self.connection)
        return [Finding(ERROR, "column_type", f"{TABLE}.{column.name} is {column.type_sql}; the project maps it as "
                        f"{wanted}.", f"ALTER TABLE {TABLE} ALTER COLUMN {column.name} TYPE {wanted} "
                        f"USING {column.name}::{wanted}")]

    def _primary_key(self, model_field, column):
        name = model_field.column
        if column is None:
            return [Finding(ERROR, "column_missing", f"{TABLE}.{name} is missing: the project identifies segments "
                            "by it.", f"ALTER TABLE {TABLE} ADD COLUMN {name} serial PRIMARY KEY")]
        found = []
        is_key = any(index.primary and index.columns == (name,) for index in self.indexes)
        sequence = f"{TABLE}_{name}_seq"
        if column.type_name not in COMPATIBLE_TYPES["AutoField"] or not is_key:
            found.append(Finding(ERROR, "primary_key", f"{TABLE}.{name} is {column.type_sql}"
                                 f"{'' if is_key else ', not the primary key'}: the project needs an integer or "
                                 "bigint primary key.", f"ALTER TABLE {TABLE} ADD PRIMARY KEY ({name}) (after "
                                 "making it integer and unique)"))
        elif not column.identity and not (column.default or "").startswith("nextval("):
            found.append(Finding(ERROR, "primary_key", f"{TABLE}.{name} has no default: segments created through "
                                 "the project (the admin, the ORM) would get no id.",
                                 f"CREATE SEQUENCE {sequence} OWNED BY {TABLE}.{name}; ALTER TABLE {TABLE} ALTER "
                                 f"COLUMN {name} SET DEFAULT nextval('{sequence}'); SELECT setval('{sequence}', "
                                 f"(SELECT coalesce(max({name}), 0) + 1 FROM {TABLE}), false);"))
        if column.type_name == "int8":
            largest = live_table.max_id(self.cursor)
            if largest is not None and largest > INT4_MAX:
                found.append(Finding(ERROR, "id_range", f"{TABLE}.{name} reaches {largest}, past the integer range the "
                                     "switch's bookkeeping (backfill claims, quarantine) stores segment ids in.",
                                     "the switch supports ids up to 2147483647; renumbering is not something to do "
                                     "in place: ask before going further"))
        return found

    def _embedding(self, column):
        from segments.demo_data import LEGACY_DIMENSIONS

        if column is not None and column.type_name == "vector":
            return []
        if column is not None and column.type_name == "halfvec" and self.phase not in (None, "legacy"):
            return []  # a column this project made, stored as halfvec (segments/storage.py): live, or replaced next
        if column is None:
            return [Finding(ERROR, "column_missing", f"{TABLE}.embedding is missing: the project needs the legacy "
                            "vector column to start from (it becomes the new 384-dim column at the swap).",
                            f"ALTER TABLE {TABLE} ADD COLUMN embedding vector({LEGACY_DIMENSIONS})")]
        width = (live_table.array_width(self.cursor, "embedding") if column.type_name.startswith("_") else None)
        width = width or LEGACY_DIMENSIONS
        return [Finding(ERROR, "embedding_type", f"{TABLE}.embedding is {column.type_sql}, not a pgvector `vector`: "
                        "as the original project's first migration made it, before its migration 003 converted it. "
                        "The project cannot search or switch it.",
                        f"ALTER TABLE {TABLE} ALTER COLUMN embedding TYPE vector({width}) USING "
                        f"embedding::vector({width}); (rewrites the table under an ACCESS EXCLUSIVE lock: "
                        "run it in a quiet moment)")]

    def _unmapped(self, mapped):
        found = []
        unmapped = importlib.import_module("segments.migrations.0005_unmapped_legacy_columns").UNMAPPED
        notes = []
        for old in unmapped:
            if old in self.columns:
                continue
            new = RENAMED.get(old)
            if new in self.columns:
                notes.append(f"{old} is named {new} here (renamed by the original project's revision 008)")
            else:
                notes.append(f"{old} is absent")
        if notes:
            found.append(Finding(INFO, "legacy_columns", f"Columns of the legacy model: {'; '.join(notes)}. Fine: "
                                 "the project does not map them (migration 0005).", "nothing to do"))
        extra = [name for name in self.columns if name not in mapped and name not in NEW_COLUMNS]
        if extra:
            found.append(Finding(INFO, "extra_columns", f"Columns the project does not map, left as they are: "
                                 f"{', '.join(extra)}.", "nothing to do: the project never reads or writes them"))
        return found

    # Indexes.

    def index_findings(self, stats_reset):
        found = self._model_indexes()
        legacy = {"legacy": "embedding", "expanded": "embedding", "swapped": "embedding_legacy"}.get(self.phase)
        for index in self.indexes:
            if index.columns and index.columns[0] == legacy and index.method != "btree":
                found.append(_legacy_vector_index(index, stats_reset))
        return found

    def _model_indexes(self):
        from django.db import models

        renamed, missing = [], []
        for declared in self.model._meta.indexes:
            if type(declared) is not models.Index or declared.condition is not None:
                continue  # the switch's own indexes (HNSW, the pending rows) are built by its steps
            columns = tuple(self.model._meta.get_field(name).column for name in declared.fields)
            same = [i for i in self.indexes if i.method == "btree" and i.columns == columns and not i.partial]
            if not same:
                missing.append((declared.name, columns))
            elif declared.name not in {i.name for i in same}:
                renamed.append(f"{declared.name} is {same[0].name} ({', '.join(columns)})")
        found = []
        if renamed:
            found.append(Finding(INFO, "index_names", f"Indexes the model declares, here under other names: "
                                 f"{'; '.join(renamed)}.", "nothing to do: no step of the switch uses them by name"))
        for name, columns in missing:
            found.append(Finding(INFO, "index_missing", f"No index on {TABLE} ({', '.join(columns)}): searches and the "
                                 "admin filtered by it read more rows.",
                                 f"CREATE INDEX CONCURRENTLY {name} ON {TABLE} ({', '.join(columns)});"))
        return found


def storage_findings(vector_version, schema):
    """Whether the server can hold the storage phase 1 will create (settings.EMBEDDING_STORAGE, or
    halfvec where pgvector has it), and whether the new column, once it exists, has the type the
    setting asks for."""
    chosen, installed = settings.EMBEDDING_STORAGE, _version(vector_version)
    halfvec_here = installed is None or installed >= HALFVEC_SINCE
    if schema is None or schema.vector_storage is None:  # phase 1 has not created the column yet
        if chosen == "halfvec" and not halfvec_here:
            return [Finding(ERROR, "storage", f"EMBEDDING_STORAGE=halfvec, but pgvector {vector_version} has no "
                            "halfvec type (0.7.0 or later): phase 1 cannot create the new column.",
                            "install a newer pgvector on the server, then, in this database: ALTER EXTENSION "
                            "vector UPDATE; or set EMBEDDING_STORAGE=vector")]
        if not chosen and not halfvec_here:
            return [Finding(WARNING, "storage", f"pgvector {vector_version} has no halfvec type (0.7.0 or later): "
                            "phase 1 creates the new column as vector (float32), twice the space of halfvec.",
                            "upgrade pgvector (then ALTER EXTENSION vector UPDATE) before phase 1 for halfvec; or set "
                            "EMBEDDING_STORAGE=vector to say that vector is meant")]
        return []
    if chosen and schema.vector_storage != chosen:
        return [Finding(WARNING, "storage", f"segments.{schema.vector_column} is {schema.vector_storage}"
                        f"({schema.vector_dimensions}) while EMBEDDING_STORAGE={chosen}: the setting "
                        "applies when phase 1 creates the column; everything else follows the column's own type.",
                        f"set EMBEDDING_STORAGE={schema.vector_storage} so that the configuration says what the "
                        "table holds")]
    return []


def _schema(using):
    try:
        return embedding_schema(using)
    except SchemaNotReady:
        return None


def _legacy_vector_index(index, stats_reset):
    opclass = index.opclasses[0] if index.opclasses else "?"
    what = f"{index.name} ({index.method} {opclass} on {index.columns[0]}{'' if index.valid else ', INVALID'})"
    since = f"since {stats_reset}" if stats_reset else "since the statistics began"
    if opclass in COSINE_OPCLASSES:
        return Finding(INFO, "vector_index", f"The legacy vector index {what} serves cosine queries on the legacy "
                       f"column (idx_scan = {index.scans} {since}).",
                       "nothing to do: the swap keeps it with the legacy column and the contract drops it")
    distance = DISTANCES.get(opclass, opclass)
    used = (f"idx_scan = {index.scans} {since}: no query has used it" if index.scans == 0 else
            f"yet idx_scan = {index.scans} {since}: some query orders by {distance} distance and uses it")
    return Finding(WARNING, "vector_index", f"The legacy vector index {what} is built for {distance} distance, while "
                   f"the search orders by cosine distance (`<=>`), which this index never serves ({used}). Every "
                   "row the backfill writes updates it all the same, which slows the backfill.",
                   "it can stay (the swap keeps it with the legacy column, the contract drops it); "
                   + ("to speed up the backfill, drop it first: `manage.py embedding_switch drop-legacy-index "
                      f"--confirm` (DROP INDEX CONCURRENTLY {index.name})"
                      if index.scans == 0 else "keep it while that query needs it"))


def dependent_findings(dependents, rules, phase):
    """Views, materialized views and rules built on `segments`, and the rules of segments."""
    swap_ahead = phase in (None, "legacy", "expanded")
    found = []
    for rule in rules:
        if phase == "final":
            found.append(Finding(INFO, "rule", f"Rule {rule.name} on {TABLE}: the switch is done, it is unaffected.",
                                 "nothing to do"))
            continue
        found.append(Finding(ERROR, "rule", f"Rule {rule.name} on {TABLE} rewrites the statements the switch runs "
                             f"on the table, and follows its columns through the swap's renames: "
                             f"{' '.join(rule.definition.split())}",
                             f"DROP RULE {rule.name} ON {TABLE}; and create it again (above) once the switch is "
                             "done (after the contract)"))
    for dependent in dependents:
        found.append(_dependent(dependent, swap_ahead, phase))
    return found


def _dependent(dependent, swap_ahead, phase):
    uses = set(dependent.columns)
    columns = "the whole row" if dependent.whole_row else ", ".join(dependent.columns)
    what = f"{dependent.kind.capitalize()} {dependent.name} uses {TABLE} ({columns})"
    if swap_ahead and "embedding" in uses:
        if dependent.kind == "view" and not dependent.has_dependents:
            return Finding(WARNING, "view", f"{what}. The swap re-points it to the new 384-dim `embedding` (it "
                           "drops and creates the view again inside its transaction, with its owner, options, "
                           "comment and grants): from the swap on it serves 384-dim vectors.",
                           f"nothing to do before the swap; deploy whatever reads {dependent.name}'s embedding "
                           "with the swap, as the application's search")
        reason = ("other views are built on it" if dependent.kind == "view" else
                  "the swap cannot re-point it without recomputing it under its lock" if dependent.kind != "rule"
                  else "after the swap's renames it would use the legacy column")
        drop = {"view": "DROP VIEW", "materialized view": "DROP MATERIALIZED VIEW"}.get(dependent.kind)
        fix = (f"{drop} {dependent.name}{' CASCADE (with the views built on it)' if dependent.has_dependents else ''};"
               " and create it again after the swap" if drop else
               f"drop the rule {dependent.name} and create it again after the swap")
        code = "rule" if dependent.kind == "rule" else "view_blocked"
        return Finding(ERROR, code, f"{what}, and the swap cannot carry it over: {reason}.", fix)
    if phase == "swapped" and "embedding_legacy" in uses:
        return Finding(WARNING, "view", f"{what}: the contract drops embedding_legacy, and cannot while it is used.",
                       f"create {dependent.name} again without embedding_legacy before `manage.py embedding_switch "
                       "contract`")
    return Finding(INFO, "view", f"{what}: the switch does not affect it.", "nothing to do")


def trigger_findings(cursor):
    """The application's triggers on `segments`, and whether the switch's writes keep them quiet."""
    found_triggers = user_triggers.user_triggers(cursor)
    if not found_triggers:
        return []
    quiet = [t for t in found_triggers if t.fires_on_vector_writes and t.quieted_by_replica]
    found, permitted = [], True
    if quiet:
        privilege = user_triggers.replication_role_privilege(cursor)
        permitted = privilege.permitted
        if not permitted:
            found.append(Finding(ERROR, "trigger_privilege", f"The trigger(s) {', '.join(t.name for t in quiet)} "
                                 f"on {TABLE} would fire on every row the switch writes (changing the "
                                 "application's data, such as updated_at). The switch's write sessions keep them "
                                 f"quiet with {user_triggers.PARAMETER} = replica, which role {privilege.role} may "
                                 "not set.", privilege.fix))
    return found + [_trigger(trigger, permitted) for trigger in found_triggers]


def _trigger(trigger, permitted):
    columns = f" OF {', '.join(trigger.update_columns)}" if trigger.update_columns else ""
    what = f"Trigger {trigger.name} ({trigger.when}{columns})"
    if not trigger.fires_on_vector_writes:
        return Finding(INFO, "trigger", f"{what}: the switch's writes (vectors only) do not fire it.", "nothing to do")
    if trigger.quieted_by_replica:
        if not permitted:
            return Finding(INFO, "trigger", f"{what} fires on the application's writes, and would on the "
                           "switch's (see the trigger_privilege error).", "see the trigger_privilege error")
        return Finding(INFO, "trigger", f"{what} fires on the application's writes; the switch's write sessions "
                       f"(backfill writer, swap catch-up, contract) set {user_triggers.PARAMETER} = replica, so it "
                       "does not fire on rows whose only change is a vector.", "nothing to do")
    mode = "ENABLE ALWAYS: it fires in every session" if trigger.enabled == "A" else (
        f"ENABLE REPLICA: it fires only in sessions with {user_triggers.PARAMETER} = replica, as the switch's "
        "writes are when other triggers need keeping quiet")
    return Finding(WARNING, "trigger", f"{what} is {mode}, so the switch's writes fire it on the rows they write.",
                   f"if it must not see them: ALTER TABLE {TABLE} ENABLE TRIGGER {trigger.name}; (the default mode, "
                   "which the switch's write sessions keep quiet)")


def history_findings(applied, alembic_revision):
    """Whether this project has adopted the table, and the original project's Alembic record."""
    found = []
    if applied is not None and "0001_initial" not in applied:
        found.append(Finding(WARNING, "not_adopted", f"{TABLE} exists, and this project has not adopted it yet "
                             "(migration segments.0001 is not recorded): a plain `manage.py migrate` would stop at "
                             f"CREATE TABLE {TABLE}.",
                             "manage.py migrate --fake-initial (records 0001 as applied without touching the table, "
                             "then applies phase 1)"))
    if alembic_revision:
        found.append(Finding(INFO, "alembic", f"alembic_version records revision {alembic_revision}: the original "
                             "project's Alembic history built this table, and this project's migrations take over.",
                             "stop running the original project's `alembic upgrade` against this database: its "
                             "later revisions change segments.embedding too"))
    return found


def before_migrating(plan, using="default", fake_initial=False):
    """What `migrate` checks before it applies `plan`, refusing with the findings and changing
    nothing: before phase 1 touches an existing table, the pre-flight's errors (and a table not
    adopted yet, without --fake-initial); before a concurrent index build, a route to the server
    that can carry its session settings (askdrchaffee.postgres.private_connection)."""
    from django.core.management.base import CommandError

    from askdrchaffee import postgres
    from segments.operations import AddIndexConcurrently

    forwards = [migration for migration, backwards in plan if not backwards and migration.app_label == "segments"]
    if any(getattr(migration, "expands", False) for migration in forwards):
        report = inspect(using=using)
        refused = report.blocking
        if not fake_initial:  # an existing table not adopted yet: CREATE TABLE would fail
            refused = refused + [f for f in report.findings if f.code == "not_adopted"]
        if refused:
            raise CommandError(
                "Phase 1 refused, nothing was changed: the live `segments` table cannot be served as it "
                "is.\n" + Report(refused).as_text()
            )
    if any(isinstance(operation, AddIndexConcurrently) for migration in forwards for operation in migration.operations):
        try:
            postgres.private_connection(using, "The concurrent index build of phase 1").close()
        except postgres.PoolerRefused as exc:
            raise CommandError(str(exc)) from exc
