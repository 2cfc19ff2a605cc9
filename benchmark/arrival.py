"""The arrival suite: how soon after its commit a segment has its vector, with `backfill_embeddings
--follow` and with the best a cron job can do, on the same stream of arrivals.

Each side gets a fresh scratch copy of `segments` (`--rows` segments, the live table's btree
indexes and pending-rows partial index, no vector index) with the project's triggers (staleness,
arrival stamp and NOTIFY), the side tables the engine and the follower use
(`embeddings_quarantine`, `embeddings_backfill_claim`, `segments_backfill_worker`,
`segments_pending_since`, and the model ledger `embeddings_vector_column`), all in the run's
scratch schema. The copied segments hold placeholder vectors (a constant unit vector), recorded in
the scratch ledger as the model's (arrival_child.py): the engine starts with nothing pending, as a
deployment that has caught up does, and nothing ever searches them.

1. **The follower**: `python -m benchmark.arrival_child` in follow mode, a child process running
   the Follower on the scratch copy (its connections come from `backfill.connector`, which refuses
   any table outside the scratch schema). Once it says it follows, segments arrive at
   `--arrival-rate` per second for `--arrival-seconds`, every other one an insert, the others
   text edits of copied segments (the staleness trigger clears their vectors), each in its own
   transaction. Its resident memory is sampled every RSS_SAMPLE_SECONDS from its start; at the
   end it gets SIGTERM and must exit 0 within STOP_WITHIN_SECONDS.
2. **The reference**: the same stream on a fresh copy, with `arrival_child` in once mode started
   again as soon as it ends: a new process each time, loading the model, then one `run_backfill`,
   which is all a cron job can do, back to back.

**The clock is the server's**: the arrival writer takes `clock_timestamp()` in the last statement
of each transaction, right before its COMMIT (`arrival_log`); a deferred constraint trigger on the
scratch copy, `ENABLE ALWAYS` (it fires even where the engine's writers quiet the application's
triggers with session_replication_role = replica), logs `clock_timestamp()` at the commit of the
transaction that writes a segment's vector, with the md5 of the text it belongs to (`vector_log`).
An arrival's latency is its vector's time minus its commit's, matched by segment and text, so an
edit counts from the edit's commit. After the stream, each side waits up to `--arrival-grace`
seconds for the last vectors; arrivals still without one are reported as missing (an arrival whose
segment was edited again before it got its vector is superseded, not missing).

The NOTIFY channel is database-wide: the live table's arrivals wake the benchmark's follower too
(a pass over the scratch copy that finds nothing more: harmless), and the benchmark's arrivals
wake a follower of the live table, which finds nothing to do there. The claim step's advisory
lock is database-wide as well: the two followers' claims take turns, each a few milliseconds.
"""
import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.db import connections

from askdrchaffee import postgres
from benchmark import backfill
from benchmark.child_process import ChildProcess
from benchmark.encoders import BenchmarkModelUnavailable
from benchmark.shapes import ensure_pending_index
from embeddings.encoder import ModelUnavailable, check_loadable
from embeddings.standins import packaged_minilm
from segments import demo_data, triggers
from segments.schema import BLANK_TEXT_PATTERN
from segments.switch.backfill import DEFAULT_BATCH_SIZE

DEFAULT_RATE = 10.0  # arrivals per second
DEFAULT_SECONDS = 60.0
DEFAULT_GRACE = 30.0  # seconds after the stream for the last vectors
TARGET_P95_SECONDS = 1.0  # "searchable within a second"
STOP_WITHIN_SECONDS = 5.0  # the follower's exit after SIGTERM
RSS_SAMPLE_SECONDS = 0.5
RSS_SERIES_POINTS = 240  # the most samples the output keeps (evenly thinned)
READY_SECONDS = 600.0  # the longest a child may take to load its model and start
SETTLE_SECONDS = 1.0  # after the follower says it follows: its first pass (over nothing) ends
CHECK_SECONDS = 0.2  # how often the suite looks for the last vectors
PENDING_SINCE = "segments_pending_since"
FOLLOWER_TABLES = (*backfill.ENGINE_TABLES, PENDING_SINCE)  # every table the follower names
ARRIVAL_LOG, VECTOR_LOG = "arrival_log", "vector_log"
VECTOR_TRIGGER = "arrival_vector_written"
KINDS = ("insert", "edit")
CHILD_MODULE = "benchmark.arrival_child"  # what `python -m` runs in each child process


class ArrivalFailed(RuntimeError):
    """A child process of the suite failed; the message holds the end of its output."""


# --- the model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArrivalModel:
    """What the children encode with: `encoder` "model" (`name`, loaded in each child) or "hashing"
    (the zero-cost HashingEncoder: the tests' seam, not offered by the command)."""

    encoder: str
    name: str | None
    label: str
    chosen: str  # why this one, in words


def choose_model(options):
    """The model of the suite: `--arrival-model` (an error if it cannot be loaded here: never
    replaced), else EMBEDDING_MODEL when it can be loaded, else the packaged all-MiniLM-L6-v2,
    saying why."""
    if options.arrival_encoder == "hashing":
        return ArrivalModel("hashing", None, "HashingEncoder (zero cost, no model)", "the zero-cost encoder (tests)")
    if options.arrival_model:
        try:
            check_loadable(options.arrival_model)
        except (ModelUnavailable, ValueError) as exc:  # ValueError: a name the hub client refuses
            raise BenchmarkModelUnavailable(f"--arrival-model {options.arrival_model!r} cannot be loaded here: "
                                            f"{exc}") from exc
        return ArrivalModel("model", options.arrival_model, options.arrival_model, "--arrival-model")
    configured = settings.EMBEDDING_MODEL
    try:
        check_loadable(configured)
    except (ModelUnavailable, ValueError):
        return ArrivalModel("model", packaged_minilm(), "all-MiniLM-L6-v2 (the packaged files)",
                            f"EMBEDDING_MODEL={configured!r} cannot be loaded here, so the packaged "
                            "all-MiniLM-L6-v2 (embeddings.standins.packaged_minilm)")
    return ArrivalModel("model", configured, configured, "EMBEDDING_MODEL")


# --- the scratch copy ---------------------------------------------------------------------------

def placeholder_sql(column):
    """The copied segments' vector: a constant unit vector, none for blank text."""
    value = float(1.0 / np.sqrt(column.dimensions))
    return (f"CASE WHEN s.text ~ '{BLANK_TEXT_PATTERN}' THEN NULL "
            f"ELSE array_fill({value!r}::real, ARRAY[{int(column.dimensions)}]) END")


def prepare(ctx):
    """A fresh scratch copy with its triggers, side tables and logs; (table, ids of the copied
    segments with text: the ones the stream edits)."""
    scratch, column = ctx.scratch, backfill_column(ctx)
    with connections[ctx.options.using].cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {scratch.table(PENDING_SINCE)}, {scratch.table(ARRIVAL_LOG)}, "
                       f"{scratch.table(VECTOR_LOG)}")
    table = backfill.prepare_tables(ctx, ctx.options.rows, vector_sql=placeholder_sql(ctx.column))
    with connections[ctx.options.using].cursor() as cursor:
        backfill.side_table(ctx, cursor, PENDING_SINCE)
        # Created with the scratch schema first in the search_path: the stamping function keeps it
        # (SET search_path FROM CURRENT), so it stamps the scratch segments_pending_since.
        with scratch.searched_first(cursor):
            cursor.execute(triggers.ARRIVAL_SQL)
        ensure_pending_index(cursor, table, "segments", ctx.column.name)
        cursor.execute(f"""
            CREATE TABLE {scratch.table(ARRIVAL_LOG)} (n int PRIMARY KEY, kind text NOT NULL, segment_id int NOT NULL,
                                                        text_md5 uuid NOT NULL, committed_at timestamptz NOT NULL);
            CREATE TABLE {scratch.table(VECTOR_LOG)} (segment_id int NOT NULL, text_md5 uuid NOT NULL,
                                                       written_at timestamptz NOT NULL);
            CREATE INDEX ON {scratch.table(VECTOR_LOG)} (segment_id, text_md5);
            CREATE OR REPLACE FUNCTION {scratch.table(VECTOR_TRIGGER)}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO {scratch.table(VECTOR_LOG)} (segment_id, text_md5, written_at)
                VALUES (NEW.id, md5(NEW.text)::uuid, clock_timestamp());
                RETURN NULL;
            END
            $$;
            CREATE CONSTRAINT TRIGGER {VECTOR_TRIGGER} AFTER UPDATE OF {column} ON {table}
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                WHEN (OLD.{column} IS NULL AND NEW.{column} IS NOT NULL)
                EXECUTE FUNCTION {scratch.table(VECTOR_TRIGGER)}();
            ALTER TABLE {table} ENABLE ALWAYS TRIGGER {VECTOR_TRIGGER};
        """)
        cursor.execute(f"SELECT id FROM {table} WHERE text !~ %s ORDER BY id", [BLANK_TEXT_PATTERN])
        ids = [segment_id for (segment_id,) in cursor.fetchall()]
    return table, ids


def backfill_column(ctx):
    return postgres.quote_ident(ctx.column.name)


# --- the stream of arrivals ---------------------------------------------------------------------

@dataclass(frozen=True)
class Arrival:
    n: int
    kind: str  # "insert" or "edit"
    text: str
    segment_id: int | None  # the segment an edit changes


def plan(count, edit_ids, seed=0):
    """`count` arrivals, inserts and edits in turn (inserts only when there is nothing to edit);
    each text is new, so that a vector is matched to the arrival it belongs to. Edits go to distinct
    segments while there are enough."""
    rng = random.Random(seed)
    texts = demo_data.generate_texts(count, seed + 1)
    edits = count // 2 if edit_ids else 0  # every odd-numbered arrival
    if edits <= len(edit_ids):
        targets = rng.sample(edit_ids, edits)
    else:
        targets = [rng.choice(edit_ids) for _ in range(edits)]
    return [Arrival(n, "edit" if edits and n % 2 else "insert", f"{texts[n]} (arrival {n + 1})",
                    targets[n // 2] if edits and n % 2 else None) for n in range(count)]


class ArrivalWriter:
    """The application's writes: one transaction per arrival on a connection of its own, its commit
    time taken on the server in the transaction's last statement."""

    def __init__(self, using, scratch):
        private, params = postgres.connection_params(using)
        params["application_name"] = "embedding_benchmark arrivals"
        self.connection = private.get_new_connection(params)
        self.connection.autocommit = False
        self.table, self.log = scratch.table("segments"), scratch.table(ARRIVAL_LOG)

    def write(self, arrival):
        with self.connection.cursor() as cursor:
            if arrival.kind == "insert":
                cursor.execute(f"INSERT INTO {self.table} (video_id, start_sec, end_sec, text, speaker_label, "
                               "video_type) VALUES ('arrivals', %s, %s, %s, 'Chaffee', 'monologue') RETURNING id",
                               [float(arrival.n), float(arrival.n + 1), arrival.text])
                segment_id = cursor.fetchone()[0]
            else:
                cursor.execute(f"UPDATE {self.table} SET text = %s WHERE id = %s", [arrival.text, arrival.segment_id])
                segment_id = arrival.segment_id
            cursor.execute(f"INSERT INTO {self.log} (n, kind, segment_id, text_md5, committed_at) "
                           "VALUES (%s, %s, %s, md5(%s)::uuid, clock_timestamp())",
                           [arrival.n, arrival.kind, segment_id, arrival.text])
        self.connection.commit()

    def close(self):
        self.connection.close()


def stream(writer, arrivals, rate, failed=lambda: None):
    """Write `arrivals` at `rate` per second, each at its time from the start (a writer that falls
    behind catches up without pausing); figures of the writer's punctuality."""
    started = time.monotonic()
    late = []
    for i, arrival in enumerate(arrivals):
        failed()
        wait = started + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        late.append(max(0.0, -wait))
        writer.write(arrival)
    seconds = time.monotonic() - started
    return {"seconds": seconds, "rate": len(arrivals) / seconds if seconds > 0 else None,
            "late_p95_ms": float(np.percentile(late, 95) * 1000) if late else None,
            "late_max_ms": max(late) * 1000 if late else None}


# --- what the logs say --------------------------------------------------------------------------

def _outcomes_sql(scratch):
    return f"""
        SELECT a.n, a.kind,
               extract(epoch FROM (SELECT min(v.written_at) FROM {scratch.table(VECTOR_LOG)} v
                                   WHERE v.segment_id = a.segment_id AND v.text_md5 = a.text_md5) - a.committed_at),
               EXISTS (SELECT 1 FROM {scratch.table(ARRIVAL_LOG)} b WHERE b.segment_id = a.segment_id AND b.n > a.n)
        FROM {scratch.table(ARRIVAL_LOG)} a ORDER BY a.n
    """


def waiting(cursor, scratch):
    """Arrivals still without their vector (superseded ones left out)."""
    cursor.execute(f"""
        SELECT count(*) FROM {scratch.table(ARRIVAL_LOG)} a
        WHERE NOT EXISTS (SELECT 1 FROM {scratch.table(VECTOR_LOG)} v
                          WHERE v.segment_id = a.segment_id AND v.text_md5 = a.text_md5)
          AND NOT EXISTS (SELECT 1 FROM {scratch.table(ARRIVAL_LOG)} b WHERE b.segment_id = a.segment_id AND b.n > a.n)
    """)
    return cursor.fetchone()[0]


def wait_for_vectors(ctx, seconds, failed=lambda: None):
    """Wait until every arrival has its vector, at most `seconds`; whether they all have."""
    deadline = time.monotonic() + seconds
    with connections[ctx.options.using].cursor() as cursor:
        while True:
            failed()
            if waiting(cursor, ctx.scratch) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(CHECK_SECONDS)


def _percentiles_ms(seconds):
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ms = np.asarray(seconds) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "mean": float(ms.mean())}


def latency_figures(ctx):
    """Each arrival's commit-to-vector latency, gathered: counts and percentiles, overall and by kind."""
    with connections[ctx.options.using].cursor() as cursor:
        cursor.execute(_outcomes_sql(ctx.scratch))
        rows = cursor.fetchall()
    latencies = {kind: [float(latency) for _, k, latency, _ in rows if k == kind and latency is not None]
                 for kind in KINDS}
    superseded = sum(1 for _, _, latency, later in rows if latency is None and later)
    embedded = sum(len(values) for values in latencies.values())
    return {
        "arrivals": len(rows),
        "with_vector": embedded,
        "missing": len(rows) - embedded - superseded,
        "superseded": superseded,
        "latency_ms": _percentiles_ms(latencies["insert"] + latencies["edit"]),
        "by_kind": {kind: {"arrivals": sum(1 for _, k, _, _ in rows if k == kind), **_percentiles_ms(values)}
                    for kind, values in latencies.items()},
    }


# --- the children -------------------------------------------------------------------------------

def child_database(using):
    """The settings a child process reaches database `using` with: the parent's own (the test
    database under the tests), the embedded server as a plain PostgreSQL at its socket."""
    wrapper = connections[using]
    database = {key: wrapper.settings_dict.get(key) for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST",
                                                                "PORT", "OPTIONS")}
    if database["ENGINE"] == "askdrchaffee.embedded_postgres":
        database.update(ENGINE="django.db.backends.postgresql", HOST=wrapper.get_connection_params()["host"])
    return database


def child_config(ctx, model, mode):
    return {
        "mode": mode,
        "database": child_database(ctx.options.using),
        "schema": ctx.scratch.schema,
        "tables": list(FOLLOWER_TABLES),
        "encoder": model.encoder,
        "model": model.name,
        "device": ctx.options.arrival_device,
        "dimensions": ctx.column.dimensions,
        "batch_size": ctx.options.backfill_batch_size or DEFAULT_BATCH_SIZE,
        "poll_seconds": settings.FOLLOW_POLL_SECONDS,
    }


class Child(ChildProcess):
    """A `python -m benchmark.arrival_child` process, its output read as it comes."""

    def __init__(self, config):
        self.started = time.monotonic()
        self.ready, self.following, self.loaded_seconds, self.mode = threading.Event(), False, None, None
        super().__init__(CHILD_MODULE, config)

    def on_event(self, event):
        if event["event"] == "loaded":
            self.loaded_seconds = event["seconds"]
        elif event["event"] == "say" and event["line"].startswith("Following:"):
            self.following, self.mode = True, event.get("mode")
            self.ready.set()

    def on_end(self):
        self.ready.set()  # whoever waits finds out

    def tail(self):
        return "\n".join(self.output) or "(no output)"

    def failure(self, what):
        rc = self.process.poll()
        how = f"exited with status {rc}" if rc is not None else "failed"
        return ArrivalFailed(f"The {what} (python -m {CHILD_MODULE}) {how}:\n{self.tail()}")

    def wait_ready(self, seconds=READY_SECONDS):
        """Wait until the follower says it follows; ArrivalFailed if it ends first or takes too long."""
        self.ready.wait(seconds)
        if not self.following or self.process.poll() is not None:
            raise self.failure("follower")

    def finish(self, timeout=None):
        """Wait for the process to end; its exit status."""
        rc = self.process.wait(timeout)
        for reader in self.readers:
            reader.join(5)
        return rc

    def event(self, name):
        return next((event for event in self.events if event["event"] == name), None)

    def end(self):
        """Make sure it has ended (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_WITHIN_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for reader in self.readers:
            reader.join(5)


class RssSampler(threading.Thread):
    """The resident memory of process `pid`, every RSS_SAMPLE_SECONDS: [(monotonic time, MB)]."""

    def __init__(self, pid):
        super().__init__(name="benchmark-arrival-rss", daemon=True)
        import psutil

        self.process, self.samples, self.stopped = psutil.Process(pid), [], threading.Event()
        self._sample()

    def _sample(self):
        import psutil

        try:
            self.samples.append((time.monotonic(), self.process.memory_info().rss / 2**20))
        except psutil.Error:
            self.stopped.set()

    def run(self):
        while not self.stopped.wait(RSS_SAMPLE_SECONDS):
            self._sample()

    def stop(self):
        self._sample()
        self.stopped.set()
        self.join()


def rss_figures(samples, ready_at, stream_started, stopped_at):
    """Start (when it follows), peak, end and slope (least squares, MB per minute) of the follower's
    resident memory while it follows; the whole series (from its start) relative to the stream's
    start, thinned to RSS_SERIES_POINTS."""
    following = [(t, mb) for t, mb in samples if ready_at <= t <= stopped_at] or samples[-1:]
    times = np.array([t for t, _ in following]) - following[0][0]
    mbs = np.array([mb for _, mb in following])
    half = times >= times[-1] / 2
    step = max(1, -(-len(samples) // RSS_SERIES_POINTS))
    return {
        "start_mb": float(mbs[0]), "max_mb": float(mbs.max()), "end_mb": float(mbs[-1]),
        "slope_mb_per_min": _slope(times, mbs), "slope_second_half_mb_per_min": _slope(times[half], mbs[half]),
        "over_s": float(times[-1]), "sample_every_s": RSS_SAMPLE_SECONDS,
        "samples": [[round(t - stream_started, 2), round(mb, 1)] for t, mb in samples[::step]],
    }


def _slope(seconds, mbs):
    """MB per minute, least squares; None for fewer than 3 samples."""
    if len(seconds) < 3 or seconds[-1] <= seconds[0]:
        return None
    return float(np.polyfit(seconds / 60.0, mbs, 1)[0])


PASS_LINE = re.compile(r"^Embedded (\d+) segment\(s\) into segments\.\S+ in ([0-9.]+) s")


def pass_figures(child):
    """The follower's passes that embedded something, from its output."""
    passes = [(int(match[1]), float(match[2])) for match in
              (PASS_LINE.match(event["line"]) for event in child.events if event["event"] == "say") if match]
    seconds = [s for _, s in passes]
    return {
        "passes": len(passes),
        "segments_per_pass": sum(n for n, _ in passes) / len(passes) if passes else None,
        "pass_seconds_p50": float(np.percentile(seconds, 50)) if seconds else None,
        "pass_seconds_p95": float(np.percentile(seconds, 95)) if seconds else None,
        "pass_seconds_max": max(seconds) if seconds else None,
        "stopped_passes": sum(1 for event in child.events
                              if event["event"] == "say" and event["line"].startswith("Pass stopped")),
    }


# --- the two sides ------------------------------------------------------------------------------

def follower_side(ctx, model, count):
    """The follower in a child process under the stream; its figures."""
    ctx.progress("arrival: the follower: preparing its scratch copy")
    _, edit_ids = prepare(ctx)
    arrivals = plan(count, edit_ids, ctx.options.seed)
    ctx.progress(f"arrival: the follower: starting it ({model.label})")
    child, sampler = Child(child_config(ctx, model, "follow")), None

    def failed():
        if child.process.poll() is not None:
            raise child.failure("follower")

    try:  # from here on the follower is stopped on every path (child.end())
        sampler = RssSampler(child.process.pid)
        sampler.start()
        child.wait_ready()
        ready_at = time.monotonic()
        time.sleep(SETTLE_SECONDS)
        failed()
        ctx.progress(f"arrival: the follower: {len(arrivals)} arrivals at {ctx.options.arrival_rate:g}/s")
        writer = ArrivalWriter(ctx.options.using, ctx.scratch)
        stream_started = time.monotonic()
        try:
            writing = stream(writer, arrivals, ctx.options.arrival_rate, failed)
        finally:
            writer.close()
        complete = wait_for_vectors(ctx, ctx.options.arrival_grace, failed)
        stop = stop_follower(child)
        sampler.stop()
    finally:
        if sampler is not None:
            sampler.stopped.set()
        child.end()
    return {
        "mode": "listen" if child.mode and "listen" in child.mode else "poll",
        "mode_said": child.mode,
        "start_seconds": ready_at - child.started,
        "model_load_seconds": child.loaded_seconds,
        "writer": writing,
        "all_embedded_in_time": complete,
        **latency_figures(ctx),
        **pass_figures(child),
        "rss": rss_figures(sampler.samples, ready_at, stream_started, stop["signalled_at"]),
        "stop": {key: value for key, value in stop.items() if key != "signalled_at"},
    }


def stop_follower(child):
    """SIGTERM, then how it ended: exit status, seconds, within STOP_WITHIN_SECONDS or not."""
    signalled = time.monotonic()
    child.process.send_signal(signal.SIGTERM)
    try:
        rc = child.finish(STOP_WITHIN_SECONDS + 5)
    except subprocess.TimeoutExpired:
        rc = None
    seconds = time.monotonic() - signalled
    stopped = child.event("stopped") or {}
    return {"signal": "SIGTERM", "exit_code": rc, "seconds": seconds, "signalled_at": signalled,
            "clean": rc == 0 and seconds <= STOP_WITHIN_SECONDS, "batch_abandoned": stopped.get("finished") is False}


class CronLoop(threading.Thread):
    """`arrival_child` in once mode, started again as soon as it ends, until `finish()`."""

    def __init__(self, config):
        super().__init__(name="benchmark-arrival-cron", daemon=True)
        self.config, self.runs, self.error = config, [], None
        self.done, self.current, self.lock = threading.Event(), None, threading.Lock()
        self.started = time.monotonic()

    def run(self):
        self.started = time.monotonic()
        while True:
            with self.lock:
                if self.done.is_set():
                    return
                child = self.current = Child(self.config)
            rc = child.finish()
            report = child.event("report") or {}
            if rc != 0 and not self.done.is_set():
                self.error = child.failure("reference run")
                return
            self.runs.append({"started_s": child.started - self.started, "seconds": time.monotonic() - child.started,
                              "exit_code": rc, "ended_by_the_suite": rc != 0 and not report,
                              "model_load_seconds": child.loaded_seconds,
                              "rows_embedded": report.get("rows_embedded"), "pass_seconds": report.get("seconds")})

    def failed(self):
        if self.error is not None:
            raise self.error

    def finish(self):
        """No new run; the one in progress (which would find nothing) is ended."""
        with self.lock:
            self.done.set()
            current = self.current
        if current is not None:
            current.end()
        self.join()


def reference_side(ctx, model, count):
    """The cron-like loop under the same stream; its figures."""
    ctx.progress("arrival: the reference: preparing its scratch copy")
    _, edit_ids = prepare(ctx)
    arrivals = plan(count, edit_ids, ctx.options.seed)
    ctx.progress(f"arrival: the reference: plain backfill runs back to back, {len(arrivals)} arrivals")
    loop = CronLoop(child_config(ctx, model, "once"))
    writer = ArrivalWriter(ctx.options.using, ctx.scratch)
    loop.start()
    try:
        try:
            writing = stream(writer, arrivals, ctx.options.arrival_rate, loop.failed)
        finally:
            writer.close()
        complete = wait_for_vectors(ctx, ctx.options.arrival_grace, loop.failed)
    finally:
        loop.finish()
    runs = [run for run in loop.runs if not run["ended_by_the_suite"]]
    return {
        "writer": writing,
        "all_embedded_in_time": complete,
        **latency_figures(ctx),
        "runs": len(runs),
        "run_list": loop.runs,
        "run_seconds_mean": float(np.mean([run["seconds"] for run in runs])) if runs else None,
        "run_seconds_max": max(run["seconds"] for run in runs) if runs else None,
        "model_load_seconds_mean": (float(np.mean([run["model_load_seconds"] for run in runs]))
                                    if runs and all(run["model_load_seconds"] is not None for run in runs) else None),
        "segments_per_run": float(np.mean([run["rows_embedded"] or 0 for run in runs])) if runs else None,
    }


def _flat(prefix, side):
    latency = side["latency_ms"]
    return {f"{prefix}_p50_ms": latency["p50"], f"{prefix}_p95_ms": latency["p95"],
            f"{prefix}_p99_ms": latency["p99"], f"{prefix}_max_ms": latency["max"],
            f"{prefix}_missing": side["missing"]}


def run(ctx):
    """Both sides under the same stream of arrivals; the suite's figures."""
    model = ctx.arrival_model or choose_model(ctx.options)
    options = ctx.options
    count = max(2, round(options.arrival_rate * options.arrival_seconds))
    load_before = os.getloadavg()[0]
    follower = follower_side(ctx, model, count)
    reference = reference_side(ctx, model, count)
    p95 = follower["latency_ms"]["p95"]
    rss = follower["rss"]
    figures = {
        "model": model.label,
        "model_name": model.name,
        "model_chosen": model.chosen,
        "device": "cpu" if model.encoder == "hashing" else options.arrival_device,
        "arrival_rate": options.arrival_rate,
        "arrival_seconds": options.arrival_seconds,
        "grace_seconds": options.arrival_grace,
        "arrivals": count,
        "inserts": follower["by_kind"]["insert"]["arrivals"],
        "edits": follower["by_kind"]["edit"]["arrivals"],
        "table_rows": options.rows,
        "rows_source": ctx.source().description,
        "engine_batch_size": options.backfill_batch_size or DEFAULT_BATCH_SIZE,
        "follower": follower,
        "reference": reference,
        **_flat("follower", follower),
        **_flat("reference", reference),
        "follower_rss_start_mb": rss["start_mb"],
        "follower_rss_max_mb": rss["max_mb"],
        "follower_rss_end_mb": rss["end_mb"],
        "follower_rss_slope_mb_per_min": rss["slope_mb_per_min"],
        "follower_stop_seconds": follower["stop"]["seconds"],
        # Other work on the machine competes with the model and the database: the 1-minute load
        # average when the suite began and when it ended.
        "load_average": [load_before, os.getloadavg()[0]],
    }
    figures["targets"] = {
        f"follower_p95_at_most_{TARGET_P95_SECONDS:g}_s": p95 is not None and p95 <= TARGET_P95_SECONDS * 1000
                                                         and follower["missing"] == 0,
        f"follower_exits_0_within_{STOP_WITHIN_SECONDS:g}_s_of_sigterm": follower["stop"]["clean"],
    }
    return figures
