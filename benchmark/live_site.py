"""The live-site suite: what a backfill does to the application beside it, unthrottled and throttled.

The application is this process, on connections of its own: `--live-ops` times a second it reads a
segment by id, runs the search (the top 10 by cosine distance through an HNSW index, `hnsw.ef_search`
EF_SEARCH, in a transaction that sets it), and inserts a segment (its own transaction, committed with
the server's `synchronous_commit`), timing each statement from the client. It runs three times, each
for `--live-seconds`, on a fresh scratch copy of `segments` (`--rows` segments, the scratch shape of
shapes.py: the live table's btree indexes and pending-rows partial index, no vector index, the new
column empty, the staleness trigger):

1. **idle**: the application alone;
2. **unthrottled**: beside `backfill_embeddings` as fast as the database takes it (the engine in a
   process of its own, benchmark/live_site_child.py, its encoder the zero-cost HashingEncoder, no rate
   cap, no replica lag limit): the window ends when the backfill ends, if that comes first;
3. **throttled**: beside the same backfill with `--max-rows-per-second` `--live-rate-cap` and the
   replica lag limit BACKFILL_MAX_REPLICA_LAG (segments/switch/throttle.py).

The search runs on a table of its own in the scratch schema (`live_search`, SEARCH_ROWS random unit
vectors of the new model's width, an HNSW cosine index with the project's m and ef_construction): the
copy's new column fills as the backfill writes, and the search the application serves meanwhile is
the live one's. Reads and inserts go to the copy the backfill writes.

For each phase: the latency of each kind of statement (p50, p95, p99, max, how many), the WAL the
server wrote (`pg_current_wal_lsn()` before and after), the rows the backfill wrote and their rate,
its WAL per row (the phase's WAL less the application's own, over the rows written: the
application's sessions' WAL from PostgreSQL 18's per-backend statistics, or before PostgreSQL 18 the
idle phase's WAL rate over as long), the full-page images and checkpoints among it (a checkpoint,
which WAL volume brings on, makes the next write of every page log the whole page), the lines its
throttle said (when it waited and why), and the worst replay lag of the server's streaming replicas
(throttle.LagTracker's measure, sampled as the application runs; none without replicas). The
source and search tables are vacuumed (FREEZE) first, so that autovacuum does not write in a phase's
window. The WAL position is the server's: another database's writes on the same server count too,
so run it on a quiet server.

Only scratch tables are written: the engine's connections refuse any table outside the scratch
schema (backfill.connector), and the application names the scratch tables in full.
"""
import io
import os
import subprocess
import threading
import time

import numpy as np
from django.conf import settings
from django.db import connections

from askdrchaffee import postgres
from benchmark import backfill
from benchmark.arrival import child_database
from benchmark.child_process import ChildProcess
from benchmark.measure import percentile_ms
from benchmark.shapes import DESCRIPTIONS, _id_vector_payload
from segments.schema import HNSW_EF_CONSTRUCTION, HNSW_M
from segments.switch.backfill import DEFAULT_BATCH_SIZE
from segments.switch.throttle import Throttle

DEFAULT_SECONDS = 20.0  # each phase's window
DEFAULT_RATE_CAP = 1000.0  # the throttled backfill's --max-rows-per-second
DEFAULT_OPS = 20.0  # the application's rounds a second: a read, a search and an insert each
SEARCH_ROWS = 20_000  # vectors of the search's table (fewer when --rows is smaller)
EF_SEARCH = 40
TOP_K = 10
READY_SECONDS = 300.0  # the longest the engine's process may take to start
CHILD_MODULE = "benchmark.live_site_child"
KINDS = ("read", "search", "insert")
PHASES = ("idle", "unthrottled", "throttled")


# --- the search's table -------------------------------------------------------------------------

def prepare_search(ctx):
    """The scratch table `live_search` (id, embedding vector(dims)) with its HNSW cosine index; its
    qualified name and row count."""
    rows, dims = min(SEARCH_ROWS, max(ctx.options.rows, 100)), ctx.column.dimensions
    table = ctx.scratch.table("live_search")
    vectors = np.random.default_rng(ctx.options.seed).standard_normal((rows, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with connections[ctx.options.using].cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {table}")
        cursor.execute(f"CREATE TABLE {table} (id int4 PRIMARY KEY, embedding vector({int(dims)}))")
        cursor.cursor.copy_expert(f"COPY {table} (id, embedding) FROM STDIN WITH (FORMAT binary)",
                                  io.BytesIO(_id_vector_payload(np.arange(1, rows + 1), vectors)))
        cursor.execute(f"CREATE INDEX ON {table} USING hnsw (embedding vector_cosine_ops) "
                       f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})")
        cursor.execute(f"VACUUM ANALYZE {table}")
    return table, rows


# --- the application ----------------------------------------------------------------------------

def new_connection(using, autocommit):
    private, params = postgres.connection_params(using)
    params["application_name"] = "embedding_benchmark live-site application"
    connection = private.get_new_connection(params)
    connection.autocommit = autocommit
    return connection


class Application:
    """The application's statements on the copy `table` and the search table, timed (seconds each)."""

    def __init__(self, ctx, table, search_table):
        self.table, self.search_table = table, search_table
        self.plain = new_connection(ctx.options.using, autocommit=True)
        self.searching = new_connection(ctx.options.using, autocommit=False)
        with self.plain.cursor() as cursor:
            cursor.execute(f"SELECT min(id), max(id) FROM {table}")
            self.first_id, self.last_id = cursor.fetchone()
        rng = np.random.default_rng(ctx.options.seed + 1)
        queries = rng.standard_normal((256, ctx.column.dimensions)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        self.queries = ["[" + ",".join(f"{x:.6f}" for x in row) + "]" for row in queries]
        self.rng = rng
        self.seconds = {kind: [] for kind in KINDS}
        self.inserted = 0

    def round(self):
        """One read, one search, one insert."""
        segment_id = int(self.rng.integers(self.first_id, self.last_id + 1))
        query = self.queries[int(self.rng.integers(len(self.queries)))]
        with self.plain.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute(f"SELECT id, video_id, start_sec, end_sec, text FROM {self.table} WHERE id = %s",
                           [segment_id])
            cursor.fetchall()
            self.seconds["read"].append(time.perf_counter() - started)
        with self.searching.cursor() as cursor:
            started = time.perf_counter()
            cursor.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(EF_SEARCH)])
            cursor.execute(f"SELECT id FROM {self.search_table} ORDER BY embedding <=> %s::vector LIMIT {TOP_K}",
                           [query])
            cursor.fetchall()
            self.searching.commit()
            self.seconds["search"].append(time.perf_counter() - started)
        with self.plain.cursor() as cursor:
            self.inserted += 1
            started = time.perf_counter()
            cursor.execute(f"INSERT INTO {self.table} (video_id, start_sec, end_sec, text) "
                           "VALUES ('live-site', %s, %s, %s) RETURNING id",
                           [self.inserted, self.inserted + 1, f"Live-site segment {self.inserted} about fasting."])
            cursor.fetchall()
            self.seconds["insert"].append(time.perf_counter() - started)

    def latency(self):
        return {kind: _percentiles(values) for kind, values in self.seconds.items()}

    def close(self):
        for connection in (self.plain, self.searching):
            connection.close()


def _percentiles(seconds):
    if not seconds:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {"count": len(seconds), **{f"p{q}": round(percentile_ms(seconds, q), 3) for q in (50, 95, 99)},
            "max": round(max(seconds) * 1000, 3)}


# --- the engine beside it -----------------------------------------------------------------------

class EngineChild(ChildProcess):
    """A `python -m benchmark.live_site_child` process, its events read as they come."""

    def __init__(self, config):
        self.started = threading.Event()
        super().__init__(CHILD_MODULE, config)

    def on_event(self, event):
        if event["event"] == "started":
            self.started.set()

    def on_end(self):
        self.started.set()  # whoever waits finds out

    @property
    def running(self):
        return self.process.poll() is None

    def wait_started(self):
        self.started.wait(READY_SECONDS)
        if not self.running and self.report() is None:
            raise LiveSiteFailed(f"The backfill beside the application (python -m {CHILD_MODULE}) exited with status "
                                 f"{self.process.poll()}:\n" + ("\n".join(self.output) or "(no output)"))

    def report(self):
        return next((event for event in self.events if event["event"] == "report"), None)

    def said(self):
        return [event["line"] for event in self.events if event["event"] == "say"]

    def end(self):
        """SIGTERM (the backfill's claims die with its sessions), then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self.readers:
            reader.join(5)


class LiveSiteFailed(RuntimeError):
    """The engine's process failed; the message holds its output."""


def child_config(ctx, max_rows_per_second, max_replica_lag):
    return {
        "database": child_database(ctx.options.using),
        "schema": ctx.scratch.schema,
        "tables": list(backfill.ENGINE_TABLES),
        "batch_size": ctx.options.backfill_batch_size or DEFAULT_BATCH_SIZE,
        "dimensions": ctx.column.dimensions,
        "max_rows_per_second": max_rows_per_second,
        "max_replica_lag": max_replica_lag,
    }


# --- one phase ----------------------------------------------------------------------------------

def wal_position(cursor):
    """(WAL position in bytes, full-page images written, checkpoints begun): the server's, all databases'."""
    cursor.execute("SELECT to_regclass('pg_catalog.pg_stat_checkpointer') IS NOT NULL")
    checkpoints = ("(SELECT num_timed + num_requested FROM pg_stat_checkpointer)" if cursor.fetchone()[0] else
                   "(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)")  # before PostgreSQL 17
    cursor.execute(f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, (SELECT wal_fpi FROM pg_stat_wal), "
                   f"{checkpoints}")
    return cursor.fetchone()


def application_wal(app):
    """The WAL the application's own sessions wrote (PostgreSQL 18's per-backend statistics, flushed
    first), or None before PostgreSQL 18."""
    with app.plain.cursor() as cursor:
        cursor.execute("SELECT to_regprocedure('pg_stat_get_backend_wal(integer)') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return None
        cursor.execute("SELECT pg_stat_force_next_flush()")  # at the end of this statement's transaction
    with app.searching.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    app.searching.commit()
    with app.plain.cursor() as cursor:
        cursor.execute("SELECT coalesce(sum((pg_stat_get_backend_wal(pid)).wal_bytes), 0)::bigint "
                       "FROM unnest(%s::int[]) AS pid", [[app.plain.info.backend_pid, app.searching.info.backend_pid]])
        return cursor.fetchone()[0]


def count_written(cursor, table, column):
    cursor.execute(f"SELECT count({postgres.quote_ident(column)}) FROM {table}")
    return cursor.fetchone()[0]


def phase(ctx, search_table, limits=None):
    """The application for `--live-seconds` on a fresh copy, beside a backfill with `limits`
    ((max_rows_per_second, max_replica_lag)) or alone (None); the phase's figures."""
    options = ctx.options
    table = backfill.prepare_tables(ctx, options.rows)
    app = Application(ctx, table, search_table)
    watch = Throttle(lambda role: new_connection(options.using, autocommit=True), max_replica_lag=None,
                     say=lambda line: None, what="the benchmark")
    child = EngineChild(child_config(ctx, *limits)) if limits is not None else None
    worst_lag, replicas = 0.0, 0
    try:
        if child is not None:
            child.wait_started()
        app_wal_before = application_wal(app)
        with app.plain.cursor() as cursor:
            wal_before, fpi_before, checkpoints_before = wal_position(cursor)
        started, interval = time.monotonic(), 1.0 / options.live_ops
        next_round = started
        while time.monotonic() - started < options.live_seconds and (child is None or child.running):
            app.round()
            health = watch.health()
            replicas = max(replicas, len(health.lags))
            worst_lag = max([worst_lag, *(lag.seconds for lag in health.lags)])
            next_round += interval
            delay = next_round - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_round = time.monotonic()  # behind: no burst to catch up
        seconds = time.monotonic() - started
        ended = child is not None and not child.running  # the backfill was done before the window
        with app.plain.cursor() as cursor:
            wal_after, fpi_after, checkpoints_after = wal_position(cursor)
        app_wal_after = application_wal(app)
        if child is not None:
            child.end()  # before the count: the rows written are those of the window
        with app.plain.cursor() as cursor:  # (its scan sets hint bits: WAL of its own, after the window's)
            written = count_written(cursor, table, ctx.column.name)
    finally:
        if child is not None:
            child.end()
        app.close()
        watch.close()
    figures = {"seconds": round(seconds, 2), "rounds": len(app.seconds["read"]), "latency_ms": app.latency(),
               "wal_bytes": wal_after - wal_before, "wal_full_page_images": fpi_after - fpi_before,
               "checkpoints": checkpoints_after - checkpoints_before,
               "application_wal_bytes": None if app_wal_before is None else app_wal_after - app_wal_before,
               "replicas": replicas,
               "replica_lag_max_s": round(worst_lag, 2) if replicas else None}
    if child is not None:
        figures["backfill"] = {
            "max_rows_per_second": limits[0], "max_replica_lag": limits[1],
            "rows_written": written, "rows_per_s": round(written / seconds, 1) if seconds else None,
            "finished_within_the_window": ended,
            "throttle_said": child.said()[:20],
        }
    return figures


def _lag_setting():
    lag = getattr(settings, "BACKFILL_MAX_REPLICA_LAG", 2.0)
    return "off" if lag is None else lag


def run(ctx):
    """The three phases; the suite's figures."""
    options = ctx.options
    load_before = os.getloadavg()[0]
    ctx.progress("live-site: the search's table and its HNSW index")
    search_table, search_rows = prepare_search(ctx)
    with connections[options.using].cursor() as cursor:  # autovacuum's WAL would count as the phases'
        cursor.execute(f"VACUUM (FREEZE, ANALYZE) {ctx.source().table}")
        cursor.execute(f"VACUUM (FREEZE, ANALYZE) {search_table}")
    phases = {}
    for name, limits, what in (
            ("idle", None, "the application alone"),
            ("unthrottled", (None, None), "beside a backfill without a throttle"),
            ("throttled", (options.live_rate_cap, "setting"), f"beside a backfill capped at "
                                                               f"{options.live_rate_cap:,g} rows/s")):
        ctx.progress(f"live-site: {what}, {options.live_seconds:g} s")
        phases[name] = phase(ctx, search_table, limits)
    idle_wal_per_s = phases["idle"]["wal_bytes"] / phases["idle"]["seconds"] if phases["idle"]["seconds"] else 0.0
    for name in ("unthrottled", "throttled"):
        side = phases[name]
        rows = side["backfill"]["rows_written"]
        own = side["application_wal_bytes"]  # else: the application's at the idle phase's rate
        net = side["wal_bytes"] - (own if own is not None else idle_wal_per_s * side["seconds"])
        side["backfill"]["wal_bytes_per_row"] = round(net / rows) if rows else None
    figures = {
        "rows": options.rows,
        "rows_source": ctx.source().description,
        "table": DESCRIPTIONS["scratch"],
        "seconds": options.live_seconds,
        "application": {"rounds_per_s": options.live_ops, "search_rows": search_rows, "ef_search": EF_SEARCH,
                        "top_k": TOP_K, "dimensions": ctx.column.dimensions},
        "engine_batch_size": options.backfill_batch_size or DEFAULT_BATCH_SIZE,
        "rate_cap": options.live_rate_cap,
        "max_replica_lag": _lag_setting(),
        "phases": phases,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    for name, side in phases.items():
        for kind in KINDS:
            for q in ("p50", "p95", "p99"):
                figures[f"{name}_{kind}_{q}_ms"] = side["latency_ms"][kind][q]
        if "backfill" in side:
            figures[f"{name}_backfill_rows_per_s"] = side["backfill"]["rows_per_s"]
            figures[f"{name}_wal_bytes_per_row"] = side["backfill"]["wal_bytes_per_row"]
    return figures
