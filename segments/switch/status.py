"""Where the switch stands: one view for `manage.py embedding_status`, the admin's "Embedding
switch" page and the end of `migrate`.

`collect(using)` returns a JSON-serialisable dict:

    phase, columns   the phase (segments.schema) and the vector columns with their widths
    rows             total, with_text, embedded, pending, quarantined, blank
    backfill         the workers running now (their claims and heartbeats), rows/s, ETA; each worker's
                     `waiting_for`: why it holds its writes back now ("" when it does not; throttle.py)
    pause            the operator's pause of the bulk writes (`embedding_switch pause`): by (host:pid),
                     since (UTC), reason, sentence; None when there is none
    index_build      a CREATE INDEX on segments in progress (pg_stat_progress_create_index), or None
    indexes          the HNSW cosine index on the new column and the legacy vector index, with validity
    index_plan       what an HNSW build on the new column would run with: maintenance_work_mem and
                     parallel workers, each with why, and the graph's estimated size
                     (segments.index_build.BuildPlan.as_dict; None without a scan)
    swap             whether the swap would be accepted now, and if not why (segments.switch.swap.refusal)
    evaluation       the last go/no-go verdict for the two columns' models (segments.evaluation.record
                     .last_verdict: verdict, reasons, figures per slice, latency curves), or None
    size             the table's total size now, before the switch, after the contract
    models           the model ledger: for each vector column, the model whose vectors it holds (name,
                     what it is, width, storage, fingerprint, how it was recorded, when)
    pending_age      for each column this project fills, the age in seconds of the oldest segment with
                     text and no current vector (None when none waits; not read past 100,000 waiting)
    undo_lacks       (swapped) segments with text and no legacy vector: what an undo would not find
    legacy_writes    (expanded) segments added since the switch began that carry a 1536-dim vector
    preflight        the pre-flight findings (segments.switch.preflight)
    migrations_waiting  the migrations a plain `migrate` would apply now ("app.name"; the operator
                     steps are not among them): code deployed ahead of its `migrate`
    steps            expand, backfill, index, swap, contract: each "done", "current" or "todo"
    warnings         sentences for the operator
    next             the next command ("command", None when there is nothing to run) and why

What it costs on a large table: `total`, `blank`, `embedded`, `undo_lacks` and `legacy_writes`
come from one sequential scan of the table's heap (not of its TOAST, where the vectors are:
testing a vector for NULL does not read it), about a second per million rows (0.09 s for
100,000 here). `pending` and `quarantined` read only the pending rows, found through the partial
index of pending rows (it holds only the rows still waiting). Everything else reads the
catalogue, the statistics views and the small bookkeeping tables. `collect(using, scan=False)`
skips the scan (those counts are then None): `brief()` does, so that `migrate` stays quick.

Far from the database what it costs is round trips: about sixty reads, each one. So after one (the
phase and the tables there are, in one statement) its parts run side by side, each on a connection of its own
opened while that statement is on its way (askdrchaffee.postgres.SideBySide), and the status costs its
connections and its longest part's round trips. The brief a step prints after the swap reads what the
next step depends on in one statement after that first one.
"""

from django.conf import settings
from django.db import ProgrammingError, connections
from psycopg2 import errors

from askdrchaffee import round_trips
from askdrchaffee.postgres import SideBySide, human_bytes  # human_bytes: the panel and the command show sizes
from embeddings import ledger
from segments import index_build
from segments.models import PendingSince, SwitchEvent, SwitchPause
from segments.schema import (
    EXPANDED, FIRST_EXPAND, HNSW_M, LIVE, NEXT_COLUMNS, TABLE, VECTOR_COLUMNS, WAITING_SINCE, SchemaNotReady,
    blank_sql, column_types, embedding_schema, pending_sql,
)
from segments.storage import COSINE_OPCLASSES
from segments.switch import catalog, gate, preflight, swap, throttle
from segments.switch.backfill import sql as backfill_sql
from segments.switch.backfill.heartbeat import ALIVE
from segments.evaluation.record import last_verdict, no_go

STALLED_SECONDS = 300  # a running worker that wrote nothing for this long is reported
VECTOR_METHODS = ("hnsw", "ivfflat")

COMMANDS = {  # the operator's sequence
    "check": "python manage.py check --database default",
    "adopt": "python manage.py migrate --fake-initial",
    "migrate": "python manage.py migrate",
    "backfill": "python manage.py backfill_embeddings",
    "follow": "python manage.py backfill_embeddings --follow",
    "makeswitch": "python manage.py makeswitch",
    "retry": "python manage.py backfill_embeddings --retry-quarantined",
    "index": "python manage.py embedding_switch index",
    "verify": "python manage.py verify_embeddings",
    "swap": "python manage.py embedding_switch swap",
    "status": "python manage.py embedding_status",
    "undo": "python manage.py embedding_switch undo",
    "contract": "python manage.py embedding_switch contract --confirm",
    "quarantine": "python manage.py embedding_quarantine",
    "pause": "python manage.py embedding_switch pause",
    "resume": "python manage.py embedding_switch resume",
}

HEARTBEATS = f"""
    SELECT w.worker_name, w.pid, w.device, w.rows_done, w.started, w.updated,
           extract(epoch FROM w.updated - w.started), extract(epoch FROM now() - w.updated),
           w.mode, w.model_name, w."column", w.last_batch_at, w.last_batch_rows, w.recent_rows_per_s,
           extract(epoch FROM now() - w.last_batch_at), {{waiting}}, {{link}}
    FROM segments_backfill_worker w
    WHERE {ALIVE}
    ORDER BY w.started, w.worker_name
"""
LIVE_CLAIMS = """
    SELECT c.worker_name, count(*), min(c.first_id), max(c.last_id) FROM embeddings_backfill_claim c
    WHERE c.expires_at >= now() OR (c.expires_at IS NULL AND EXISTS (SELECT 1 FROM pg_stat_activity a
        WHERE a.pid = c.worker_pid AND (a.backend_start IS NULL OR a.backend_start = c.worker_started_at)))
    GROUP BY c.worker_name ORDER BY c.worker_name
"""
INDEX_BUILD = """
    SELECT p.pid, p.command, p.phase, CASE WHEN p.index_relid = 0 THEN NULL ELSE p.index_relid::regclass::text END,
           p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total
    FROM pg_stat_progress_create_index p WHERE p.relid = to_regclass(%s) ORDER BY p.pid LIMIT 1
"""


def collect(using="default", scan=True):
    """Where the switch stands on database `using`, as a JSON-serialisable dict (module docstring).

    Its parts are read side by side (askdrchaffee.postgres.SideBySide: each in a transaction of its
    own, the counts in one statement, so that they add up while a backfill writes), on connections
    opened while the phase is read: far from the database the status costs its connections and its
    longest part's round trips, not all of them in turn."""
    return _collect(using, scan)


TABLES = """
    SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v') AND n.nspname NOT IN ('pg_catalog', 'pg_toast')
      AND pg_catalog.pg_table_is_visible(c.oid)
"""  # the tables and views the search_path shows, as Django's introspection lists them


def _first_read(using):
    """(the rows of VECTOR_COLUMNS, of TABLES, whether the table was ever expanded: schema.expanded_before()):
    the phase and the tables there are, in one statement. That reads django_migrations: where it does not
    exist yet, the statement fails and goes again without it (inside the caller's transaction, which the
    failure would end, it does not read it: None)."""
    connection = connections[using]
    with connection.cursor() as cursor:
        if not connection.in_atomic_block:
            try:
                type_rows, table_rows, ((expanded,),) = round_trips.reads(cursor, (VECTOR_COLUMNS, [TABLE]), TABLES,
                                                                         EXPANDED)
                return type_rows, table_rows, expanded
            except ProgrammingError as exc:
                if not isinstance(exc.__cause__, errors.UndefinedTable):
                    raise
        return (*round_trips.reads(cursor, (VECTOR_COLUMNS, [TABLE]), TABLES), None)


PARTS = 12  # the status's parts (_parts), read side by side: their connections open while the phase is read


def _collect(using, scan, first=None):
    """collect(); `first`: what _first_read() said, when read already."""
    with SideBySide(using, PARTS) as readers:
        type_rows, table_rows, expanded = first or _first_read(using)
        tables = {name for (name,) in table_rows}
        try:
            schema = embedding_schema(using, types=column_types(type_rows), recorded="django_migrations" in tables,
                                      expanded=expanded)
        except SchemaNotReady as exc:
            return _without_table(using, str(exc))
        parts = readers.run(_parts(using, schema, tables, scan))
    (rows, extra), index_plan = parts["rows"]
    models, pending_age = parts["models"]
    workers, (pause, index_build) = parts["workers"], parts["activity"]
    indexes, size = parts["indexes"]
    status = {
        "phase": schema.phase,
        "columns": {"vector": _column(schema.vector_column, schema.vector_dimensions, schema.vector_storage),
                    "legacy": _column(schema.legacy_column, schema.legacy_dimensions, schema.legacy_storage)},
        "rows": rows,
        "backfill": _rates(workers, rows, schema.legacy_column),
        "pause": pause,
        "index_build": index_build,
        "indexes": indexes,
        "size": size,
        "index_plan": index_plan,
        "models": models,
        "pending_age": pending_age,
        **extra,
    }
    reason, status["evaluation"] = parts["swap"], parts["evaluation"]
    reason = reason or (no_go(status["evaluation"]) if schema.phase == "expanded" else None)
    status["swap"] = {"done": schema.is_live, "accepted": reason is None, "refusal": reason}
    status["preflight"] = _preflight(preflight.report(schema, parts))
    status["adopted"], status["migrations_waiting"] = parts["migrations"]
    status["steps"] = steps(status)
    status["warnings"] = warnings(status)
    status["next"] = next_step(status)
    return status


def _parts(using, schema, tables, scan):
    """The status's reads, each a callable on database `using` (side by side: each its own connection)."""
    def read(work):
        def part():
            with connections[using].cursor() as cursor:
                return work(cursor)
        return part

    def events():
        """(the latest "before" SwitchEvent, the latest "contract" one since it), in one query."""
        if SwitchEvent._meta.db_table not in tables:  # before migration 0002
            return None, None
        found = list(SwitchEvent.objects.using(using).filter(step__in=("before", "contract")).order_by("-at", "-id"))
        before = next((event for event in found if event.step == "before"), None)
        contract = next((event for event in found if event.step == "contract"
                         and (before is None or event.at >= before.at)), None)
        return before, contract

    def rows_and_plan(cursor):
        rows, extra = _rows(cursor, schema, SwitchEvent._meta.db_table in tables, scan)
        return (rows, extra), _index_plan(cursor, schema, rows)

    def indexes_and_size(cursor):
        return ({"hnsw": _hnsw_index(cursor, schema.vector_column), "legacy": _legacy_index(cursor, schema.legacy_column)},
                _size(cursor, schema.phase, *events()))

    def models_and_age(cursor):
        models = _models(cursor, tables)
        return models, _pending_age(cursor, schema, models, tables)

    return {
        "rows": read(rows_and_plan),
        "models": read(models_and_age),
        # Workers and their leased claims come with migration 0009 (whose pending_since table marks it).
        "workers": read(lambda cursor: _workers(cursor, heartbeats=PendingSince._meta.db_table in tables,
                                                claims=PendingSince._meta.db_table in tables,
                                                waiting=SwitchPause._meta.db_table in tables)),
        "activity": read(lambda cursor: (_pause(cursor, SwitchPause._meta.db_table in tables), _index_build(cursor))),
        "indexes": read(indexes_and_size),
        "swap": lambda: swap.refusal(using=using),
        "evaluation": lambda: last_verdict(using),
        "migrations": lambda: _migrations(using),
        **preflight.parts(using, schema),
    }


def brief(using="default"):
    """A few lines for the end of `migrate` and of each operator step: the phase and the next command (no
    table scan). After the swap, two statements (_next_after_the_swap); before, the status's parts."""
    first = _first_read(using)
    return _brief_lines(_next_after_the_swap(using, *first[:2]) or _collect(using, scan=False, first=first))


def brief_reads():
    """The reads brief() makes once the swap is done, for a step to send with its last message (round_trips.reads,
    after its other statements: they see what it did); brief_from() makes the lines of their answers."""
    return [(VECTOR_COLUMNS, [TABLE]), TABLES, *_after_the_swap_reads()]


def brief_from(using, answers):
    """brief()'s lines from `answers`, those of brief_reads() (brief() itself before the swap)."""
    type_rows, table_rows, *read = answers
    status = _next_after_the_swap(using, type_rows, table_rows, read)
    return brief(using) if status is None else _brief_lines(status)


def _brief_lines(status):
    lines = [f"phase: {status['phase'] or 'no segments table'}"]
    step = status["next"]
    lines.append(f"next: {step['command'] or 'nothing'} ({step['why']})")
    lines.append(f"`{COMMANDS['status']}` shows the whole picture.")
    return lines


# What the next step depends on once the swap is done (next_step: the migrations waiting, the pause, the
# workers and the rows still pending, the live column's model), and the tables it is read from.
AFTER_THE_SWAP_TABLES = {"django_migrations", throttle.PAUSE_TABLE, PendingSince._meta.db_table, ledger.LEDGER,
                         "segments_backfill_worker", "embeddings_backfill_claim", "embeddings_quarantine"}


def _after_the_swap_reads():
    return ["SELECT app, name FROM django_migrations", (throttle.PAUSE_QUERY, [throttle.SCOPE]), heartbeats_query(),
            LIVE_CLAIMS, backfill_sql.count_pending_and_quarantined_sql(LIVE),
            (ledger.ACTIVE, {"table": TABLE, "name": TABLE})]


def _next_after_the_swap(using, type_rows, table_rows, read=None):
    """The part of the status next_step() reads (phase, columns, rows pending, backfill, pause, models,
    migrations_waiting) with `next`, for a table at the swap's phase or after it (`type_rows`, `table_rows`:
    what _first_read() said), in one more statement (far from the database, 2 round trips in all where the
    whole status costs its parts' connections), or from `read`, the answers of _after_the_swap_reads() read
    already. None before the swap, or before this project's bookkeeping tables."""
    types, tables = column_types(type_rows), {name for (name,) in table_rows}
    if LIVE not in types or any(column in types for column in NEXT_COLUMNS) or not AFTER_THE_SWAP_TABLES <= tables:
        return None  # no table, or before the swap: the whole status
    if read is None:
        with connections[using].cursor() as cursor:
            read = round_trips.reads(cursor, *_after_the_swap_reads())
    applied, pause, heartbeats, claims, ((pending, quarantined),), models = read
    applied = {tuple(row) for row in applied}
    schema = embedding_schema(using, types=types, expanded=("segments", FIRST_EXPAND) in applied)
    waiting = gate.plain_migrate_waiting_from(applied)
    if not schema.is_live or waiting is None:
        return None  # the original table, never expanded: the whole status (the pre-flight)
    rows = {**dict.fromkeys(("total", "with_text", "embedded", "blank")), "pending": pending, "quarantined": quarantined}
    status = {
        "phase": schema.phase,
        "columns": {"vector": _column(schema.vector_column, schema.vector_dimensions, schema.vector_storage),
                    "legacy": _column(schema.legacy_column, schema.legacy_dimensions, schema.legacy_storage)},
        "rows": rows,
        "backfill": _rates(_workers_from(heartbeats, claims), rows, schema.legacy_column),
        "pause": _pause_from(throttle.Pause(*pause[0]) if pause else None),
        "models": {column: {"model": entry.identity.name} for column, entry in ledger.entries_from(models).items()},
        "migrations_waiting": waiting,
    }
    status["next"] = next_step(status)
    return status


# The parts.

def _without_table(using, problem):
    status = {"phase": None, "problem": problem, "columns": {"vector": None, "legacy": None},
              "rows": dict.fromkeys(("total", "with_text", "embedded", "pending", "quarantined", "blank")),
              "backfill": {"running": False, "workers": [], "rows_per_s": None, "eta_seconds": None},
              "index_build": None, "indexes": {"hnsw": None, "legacy": None}, "index_plan": None,
              "swap": {"done": False, "accepted": False, "refusal": problem},
              "size": {"now_bytes": None, "before_bytes": None, "after_contract_bytes": None},
              "undo_lacks": None, "legacy_writes": None, "preflight": {"findings": [], "blocking": 0},
              "models": {}, "pending_age": {}, "pause": None, "evaluation": None,
              "adopted": False, "migrations_waiting": gate.plain_migrate_waiting(using)}
    status["steps"] = steps(status)
    status["warnings"] = []
    status["next"] = _next("migrate", "creates the segments table and applies phase 1 (expand)")
    return status


def _column(name, dimensions, type_name):
    return None if name is None else {"name": name, "dimensions": dimensions, "type": type_name}


BEFORE_AT = (f"(SELECT e.at FROM {SwitchEvent._meta.db_table} e WHERE e.step = 'before' "
             "ORDER BY e.at DESC, e.id DESC LIMIT 1)")  # when the switch began (its "before" SwitchEvent)


def _rows(cursor, schema, events, scan):
    """(the row counts, {"undo_lacks", "legacy_writes"}): the scan's counts, then the pending ones.
    `events`: whether the SwitchEvent table exists (legacy_writes count from its "before" event)."""
    column, legacy = schema.vector_column, schema.legacy_column
    counts = dict.fromkeys(("total", "with_text", "embedded", "pending", "quarantined", "blank"))
    extra = {"undo_lacks": None, "legacy_writes": None}
    if scan:
        parts = ["count(*)", f"count(*) FILTER (WHERE {blank_sql()})"]
        if column:
            parts.append(f"count(s.{column})")
        if schema.phase == "swapped":  # segments with text and no legacy vector: the pending predicate's
            parts.append(f"count(*) FILTER (WHERE {pending_sql(legacy)})")
        if schema.phase == "expanded" and events:  # in the same scan, from the event's time read in it
            parts.append(f"count(*) FILTER (WHERE s.created_at > ({BEFORE_AT} AT TIME ZONE 'UTC') "
                         f"AND s.{legacy} IS NOT NULL)")
            parts.append(f"{BEFORE_AT} IS NOT NULL")
    queries = [f"SELECT {', '.join(parts)} FROM {TABLE} s"] if scan else []
    if column:
        queries.append(backfill_sql.count_pending_and_quarantined_sql(column))
    read = round_trips.reads(cursor, *queries) if queries else []  # one statement
    if scan:
        found = list(read.pop(0)[0])
        counts["total"], counts["blank"] = found.pop(0), found.pop(0)
        counts["with_text"] = counts["total"] - counts["blank"]
        if column:
            counts["embedded"] = found.pop(0)
        if schema.phase == "swapped":
            extra["undo_lacks"] = found.pop(0)
        if schema.phase == "expanded" and events:
            legacy_writes, began = found.pop(0), found.pop(0)
            extra["legacy_writes"] = legacy_writes if began else None
    if column:
        counts["pending"], counts["quarantined"] = read.pop(0)[0]
    return counts, extra


def _models(cursor, tables):
    """{column: what the model ledger records for it} (embeddings.ledger)."""
    if ledger.LEDGER not in tables:  # before the ledger's migration
        return {}
    return {column: {"model": entry.identity.name, "description": entry.identity.description,
                     "dimensions": entry.identity.dimensions, "storage": entry.storage,
                     "fingerprint": entry.identity.short_fingerprint, "source": entry.source,
                     "recorded_at": entry.recorded_at.isoformat(), "query_instruction": entry.identity.query_instruction,
                     "summary": str(entry.identity)}
            for column, entry in ledger.entries(cursor, TABLE).items()}


PENDING_AGE_READ_UP_TO = 100_000


def _pending_age(cursor, schema, models, tables):
    """{column: seconds the oldest waiting segment has waited, or None} for the columns this project
    fills (the new model's; and the live one when its vectors were written here), in one statement (the
    ages are not read past PENDING_AGE_READ_UP_TO segments waiting for the new model)."""
    columns = [schema.vector_column] if schema.vector_column else []
    if schema.phase == "expanded" and models.get(schema.legacy_column, {}).get("source") not in (None, "declared",
                                                                                                "simulated"):
        columns.append(schema.legacy_column)
    if not columns or PendingSince._meta.db_table not in tables:  # before migration 0009
        return dict.fromkeys(columns)
    ages = ", ".join(
        f"CASE WHEN n.waiting > {PENDING_AGE_READ_UP_TO} THEN NULL ELSE (SELECT extract(epoch FROM now() - "
        f"min({WAITING_SINCE})) FROM {TABLE} s LEFT JOIN {PendingSince._meta.db_table} p ON p.segment_id = s.id "
        f"WHERE {pending_sql(column)}) END" for column in columns)
    cursor.execute(f"SELECT {ages} FROM (SELECT count(*) AS waiting FROM {TABLE} s "
                   f"WHERE {pending_sql(schema.vector_column)}) n")
    return {column: None if age is None else round(float(age), 1) for column, age in zip(columns, cursor.fetchone())}


def live_column(status):
    """The column the application's search reads now, when this project fills it: its pending age is
    the health of the search."""
    if status["phase"] in ("swapped", "final"):
        return status["columns"]["vector"]["name"]
    if status["phase"] == "expanded" and (status["columns"]["legacy"] or {}).get("name") in status["pending_age"]:
        return status["columns"]["legacy"]["name"]
    return None


def heartbeats_query(waiting=True):
    """HEARTBEATS, with the columns migration 0011 adds when `waiting`."""
    return HEARTBEATS.format(waiting="w.waiting_for" if waiting else "NULL",
                             link="w.round_trip_ms, w.batches_in_flight" if waiting else "NULL, NULL")


def _workers(cursor, heartbeats=True, claims=True, waiting=True):
    """The workers running now: heartbeats of live runs, and live claims of workers that have not
    written a batch yet."""
    heartbeat_rows = claim_rows = []
    if heartbeats:
        cursor.execute(heartbeats_query(waiting))
        heartbeat_rows = cursor.fetchall()
    if claims:
        cursor.execute(LIVE_CLAIMS)
        claim_rows = cursor.fetchall()
    return _workers_from(heartbeat_rows, claim_rows)


def _iso(moment):
    """A timestamp as ISO 8601 text (one read through JSON is that text already)."""
    return moment if moment is None or isinstance(moment, str) else moment.isoformat()


def _workers_from(heartbeat_rows, claim_rows):
    """_workers() from the rows of heartbeats_query() and LIVE_CLAIMS."""
    workers = [
        {"name": name, "pid": pid, "device": device, "rows_done": done,
         "rows_per_s": round(done / float(elapsed), 1) if elapsed else None,
         "started": _iso(started), "updated": _iso(updated),
         "seconds_since_update": round(float(idle), 1), "claims": 0, "claimed_ids": None,
         "mode": mode, "model": model, "column": column or None,
         "last_batch_at": _iso(last_at), "last_batch_rows": last_rows,
         "seconds_since_last_batch": None if since_batch is None else round(float(since_batch), 1),
         "recent_rows_per_s": recent, "waiting_for": waiting_for or "",
         "round_trip_ms": round_trip_ms, "batches_in_flight": in_flight}
        for (name, pid, device, done, started, updated, elapsed, idle, mode, model, column, last_at, last_rows,
             recent, since_batch, waiting_for, round_trip_ms, in_flight) in heartbeat_rows
    ]
    for name, claims, first_id, last_id in claim_rows:
        mine = [worker for worker in workers if worker["name"] == name]
        if not mine:
            mine = [{"name": name, "pid": None, "device": None, "rows_done": 0, "rows_per_s": None,
                     "started": None, "updated": None, "seconds_since_update": None, "mode": None, "model": None,
                     "column": None, "last_batch_at": None, "last_batch_rows": None,
                     "seconds_since_last_batch": None, "recent_rows_per_s": None, "waiting_for": "",
                     "round_trip_ms": None, "batches_in_flight": None}]
            workers.append(mine[0])
        mine[0].update(claims=claims, claimed_ids=[first_id, last_id])
    return workers


def _rates(workers, rows, other_column):
    """The workers with the rows/s and the ETA (of the pending rows the quarantine does not hold) of those
    filling the new model's column: not those writing `other_column` (the other model's: its follower).
    A heartbeat may name a column a swap has renamed since: it counts as the new model's."""
    filling = [worker for worker in workers if other_column is None or worker["column"] != other_column]
    rates = [worker["rows_per_s"] for worker in filling if worker["rows_per_s"]]
    rate = round(sum(rates), 1) if rates else None
    open_rows = None if rows["pending"] is None else rows["pending"] - rows["quarantined"]
    eta = round(open_rows / rate) if rate and open_rows is not None else None
    # A follower runs for good: the switch waits for it only while it has rows to catch up on.
    catching_up = bool(open_rows) and any((worker["mode"] or "").startswith("follow") for worker in filling)
    running = catching_up or any(not (worker["mode"] or "").startswith("follow") for worker in filling)
    return {"running": running, "workers": workers, "rows_per_s": rate, "eta_seconds": eta}


def _pause(cursor, table_exists=None):
    """The operator's pause of the bulk writes (steps.pause), or None."""
    return _pause_from(throttle.current_pause(cursor, table_exists))


def _pause_from(found):
    """_pause() from throttle.current_pause()'s answer."""
    if found is None:
        return None
    return {"by": found.by, "since": found.at, "reason": found.reason, "sentence": found.sentence()}


def _percent(done, total):
    return round(100.0 * done / total, 1) if total else None


def _index_build(cursor):
    cursor.execute(INDEX_BUILD, [TABLE])
    row = cursor.fetchone()
    if row is None:
        return None
    pid, command, phase, index, blocks_done, blocks_total, tuples_done, tuples_total = row
    return {"pid": pid, "command": command, "phase": phase, "index": index,
            "blocks_done": blocks_done, "blocks_total": blocks_total,
            "percent_blocks": _percent(blocks_done, blocks_total),
            "tuples_done": tuples_done, "tuples_total": tuples_total,
            "percent_tuples": _percent(tuples_done, tuples_total)}


def _vector_indexes(cursor, column, method=None, opclass=None):
    """The vector indexes on segments.`column`, valid ones first, found by what they are."""
    found = [index for index in catalog.column_indexes(cursor, column)
             if index.method in VECTOR_METHODS and method in (None, index.method) and opclass in (None, index.opclass)]
    return sorted(found, key=lambda index: not index.valid)


def _hnsw_index(cursor, column):
    """The HNSW cosine index the search uses (as segments.search.cosine_index finds it)."""
    found = [index for index in _vector_indexes(cursor, column, "hnsw") if index.opclass in COSINE_OPCLASSES] \
        if column else []
    return {"name": found[0].name, "valid": found[0].valid} if found else None


def _legacy_index(cursor, column):
    found = _vector_indexes(cursor, column) if column else []
    if not found:
        return None
    index = found[0]
    return {"name": index.name, "method": index.method, "opclass": index.opclass, "valid": index.valid}


def _index_plan(cursor, schema, rows):
    """The HNSW build's plan for the rows the column holds once backfilled (before the swap: every
    segment with text), or None without a vector column or a scan."""
    if schema.vector_column is None or rows["embedded"] is None:
        return None
    vectors = max(rows["embedded"], rows["with_text"]) if schema.phase == "expanded" else rows["embedded"]
    return index_build.plan(cursor, TABLE, schema.vector_column, HNSW_M, rows=vectors).as_dict()


def _size(cursor, phase, before, contract):
    cursor.execute("SELECT pg_total_relation_size(to_regclass(%s))", [TABLE])
    now = cursor.fetchone()[0]
    after = (contract.details or {}).get("total_bytes") if contract is not None else None
    return {"now_bytes": now, "before_bytes": (before.details or {}).get("total_bytes") if before else None,
            "after_contract_bytes": after if after is not None or phase != "final" else now}


def _preflight(report):
    return {"findings": [{"level": f.level, "code": f.code, "message": f.message, "fix": f.fix}
                         for f in report.findings],
            "blocking": len(report.blocking)}


def _migrations(using):
    """(whether migration segments.0001 is recorded (made here, or adopted with --fake-initial), the
    migrations a plain `migrate` would apply now), from one read of the recorded migrations."""
    executor = gate.LockRetryingExecutor(connections[using])
    return ("segments", "0001_initial") in executor.loader.applied_migrations, gate.plain_migrate_waiting(using, executor)


# What it means.

def _open_pending(status):
    rows = status["rows"]
    return None if rows["pending"] is None else rows["pending"] - rows["quarantined"]


def steps(status):
    """[{"step", "state"}] for expand, backfill, index, swap, contract: "done", "current" or "todo"."""
    phase = status["phase"]
    order = ["expand", "backfill", "index", "swap", "contract"]
    if phase in (None, "legacy"):
        done, current = 0, "expand"
    elif phase == "final":
        done, current = 5, None
    elif phase == "swapped":
        done, current = 4, "contract"
    elif status["backfill"]["running"] or _open_pending(status):
        done, current = 1, "backfill"
    elif not (status["indexes"]["hnsw"] or {}).get("valid"):
        done, current = 2, "index"
    else:
        done, current = 3, "swap"
    return [{"step": step, "state": "done" if i < done else "current" if step == current else "todo"}
            for i, step in enumerate(order)]


def human_duration(seconds):
    """`seconds` as "4 s", "3 min 05 s" or "2 h 10 min" ("unknown" for None)."""
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def next_step(status):
    """{"command": the next command of the operator's sequence (None: nothing to run), "why"}."""
    phase, backfill = status["phase"], status["backfill"]
    pending = _open_pending(status)
    if phase == "legacy":
        if status["preflight"]["blocking"]:
            return _next("check", "fix the pre-flight findings first, then check again")
        if not status["adopted"]:
            return _next("adopt", "adopts the existing table and applies phase 1 (expand)")
        return _next("migrate", "applies phase 1 (expand): the new column; nothing else changes")
    if status["migrations_waiting"]:
        return _next("migrate", f"applies {_names(status['migrations_waiting'])}, which this code needs")
    if status.get("pause"):
        return _next("resume", f"the switch's bulk writes are {status['pause']['sentence']}: the backfill, the "
                               "contract and the followers' catch-up wait until then")
    if backfill["running"]:
        after = _after_backfill(status)
        return {**after, "why": f"once the running backfill finishes (ETA {human_duration(backfill['eta_seconds'])}); "
                                f"then: {after['why']}"}
    if pending:
        return _next("backfill", f"{pending:,} segment(s) with text have no {_width(status)}-dim vector yet")
    return _after_backfill(status)


def _after_backfill(status):
    """The next step once nothing is left for the backfill."""
    phase, quarantined = status["phase"], status["rows"]["quarantined"] or 0
    if phase == "swapped":
        return _next("contract", "later, once the new search has served long enough (irreversible); "
                                 f"`{COMMANDS['undo']}` if it disappoints")
    if phase != "expanded":
        live = status["models"].get(status["columns"]["vector"]["name"]) if status["columns"]["vector"] else None
        if live is not None and live["model"] != settings.EMBEDDING_MODEL:
            return _next("makeswitch", f"EMBEDDING_MODEL is {settings.EMBEDDING_MODEL}, and segments.embedding holds "
                                       f"{live['model']}: write the next switch (README \"Switching again\")")
        return {"command": None, "why": f"the switch is done; keep `{COMMANDS['follow']}` running, so that new and "
                                        "edited segments are searchable at once"}
    build, hnsw = status["index_build"], status["indexes"]["hnsw"] or {}
    if build is not None:
        return _next("verify", f"once the index build finishes (now: {build['phase']})")
    if not hnsw.get("valid"):
        return _next("index", "builds the HNSW index over the filled column, without blocking")
    if quarantined:
        return _next("retry", f"{quarantined:,} quarantined segment(s) hold the swap back "
                              f"(`{COMMANDS['quarantine']}` lists them with the reason)")
    if status["swap"]["refusal"]:
        return {"command": None, "why": status["swap"]["refusal"]}
    return _next("verify", f"then `{COMMANDS['swap']}`: the swap would be accepted now")


def _next(key, why):
    return {"command": COMMANDS[key], "why": why}


def _names(migrations, shown=3):
    """The first `shown` of `migrations`, and how many more."""
    more = len(migrations) - shown
    return ", ".join(migrations[:shown]) + (f" and {more} more" if more > 0 else "")


def _width(status):
    column = status["columns"]["vector"]
    return column["dimensions"] if column else "new"


def warnings(status):
    """Sentences for the operator: what needs looking at now."""
    found = []
    if status["phase"] not in (None, "legacy") and status["migrations_waiting"]:
        found.append(f"`{COMMANDS['migrate']}` has not applied {_names(status['migrations_waiting'])}: "
                     "the commands that need them refuse until it has.")
    if status.get("legacy_writes"):
        found.append(
            f"{status['legacy_writes']:,} segment(s) added since the switch began carry a "
            f"{status['columns']['legacy']['dimensions']}-dim vector in `{status['columns']['legacy']['name']}`: "
            "an application still writes the old model's vectors. After the swap such INSERTs fail with "
            f"`expected {_width(status)} dimensions, not {status['columns']['legacy']['dimensions']}`: deploy the "
            "application code that writes the new vectors (or none) before the swap.")
    if status.get("undo_lacks"):
        found.append(
            f"{status['undo_lacks']:,} segment(s) with text have no legacy vector (added or edited since the swap): "
            f"after `{COMMANDS['undo']}` the old search would not find them.")
    if status["rows"]["quarantined"]:
        found.append(f"{status['rows']['quarantined']:,} segment(s) are quarantined: the model could not embed "
                     f"them (`{COMMANDS['quarantine']}` says why).")
    hnsw, legacy = status["indexes"]["hnsw"], status["indexes"]["legacy"]
    building = status["index_build"] is not None
    if hnsw is not None and not hnsw["valid"] and not building:
        found.append(f"The HNSW index {hnsw['name']} is INVALID (an interrupted build): "
                     f"`{COMMANDS['index']}` builds it again.")
    plan = status.get("index_plan") or {}
    if status["phase"] == "expanded" and not (hnsw or {}).get("valid") and plan.get("warning"):
        found.append(f"Before `{COMMANDS['index']}`: {plan['warning']}")
    if legacy is not None and not legacy["valid"] and not building:
        found.append(f"The legacy vector index {legacy['name']} is INVALID: the legacy search scans the table.")
    if status.get("pause"):
        found.append(f"The switch's bulk writes are {status['pause']['sentence']}: `{COMMANDS['resume']}` lets "
                     "them go on.")
    for worker in status["backfill"]["workers"]:
        idle = worker.get("seconds_since_last_batch")
        if worker.get("mode") == "backfill" and idle is not None and idle > STALLED_SECONDS:
            waits = f": it waits, {worker['waiting_for']}" if worker.get("waiting_for") else ""
            found.append(f"Backfill worker {worker['name']} has written nothing for {human_duration(idle)}{waits}.")
    live = live_column(status)
    age = status["pending_age"].get(live) if live else None
    if age is not None and age > settings.PENDING_WARNING_SECONDS:
        following = [w for w in status["backfill"]["workers"] if (w.get("mode") or "").startswith("follow")]
        fix = ("the followers are behind: look at their output" if following else
               f"no follower is running: start `{COMMANDS['follow']}`, or run `{COMMANDS['backfill']}`")
        found.append(f"The oldest segment waiting for its vector in segments.{live} has waited "
                     f"{human_duration(age)} (more than {human_duration(settings.PENDING_WARNING_SECONDS)}): the "
                     f"search does not find it yet; {fix}.")
    return found
