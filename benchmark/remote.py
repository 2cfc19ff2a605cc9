"""The remote suite: the switch run from far from its database, at several round trips, side by side.

An operator embeds on a GPU at home and the database runs on a managed host abroad. For each round
trip of `--remote-round-trips` (0, 25, 50 and 100 ms by default) the suite puts the project's delay
proxy (benchmark/delay_proxy.py, a process of its own) in front of the database, measures the round
trip it really adds, and runs through it, as an operator would (each step a `manage.py` process
whose DATABASE_URL and DATABASE_DIRECT_URL name the proxy), while the application stays next to
the database (this process, on direct connections):

1. **the engine**: the backfill over `--remote-engine-rows` segments, with the zero-cost encoder
   and with a simulated GPU (`--simulated-gpu-rate`), in a process of its own (remote_child.py): its
   pass's rows/s (the engine), and its rate counting the worker's start (connections, the model
   ledger's checks: paid once a run); each `--remote-engine-runs` times, the run of median pass kept
   (every run's rate listed beside it);
2. **the follower**: `backfill_embeddings --follow` with the suite's model; `--remote-arrivals`
   segments inserted next to the database at `--remote-arrival-rate` a second; from each insert's
   commit to its vector's (seen by a poll every 10 ms): p50, p95, max;
3. **verify_embeddings** and **embedding_status**: the commands' wall time, the median of COMMAND_RUNS;
4. **the swap and the undo** (`embedding_switch swap`, then `undo`) while the application inserts
   `--remote-app-rate` segments a second: the slowest insert while each runs; of it, what the step's
   lock caused (the slowest insert running while the server held the writes, by the server's own
   measure in the step's SwitchEvent, and the longest the application's session was seen blocked by
   a lock, sampled every 5 ms); and the writes held as the server measured them;
5. **the contract** (`embedding_switch contract --confirm`, after a second swap): its wall time, the
   median of COMMAND_RUNS, each on a fresh copy of the swapped table.

**Side by side.** This machine's other work moves a run's figures by a fifth from one minute to the
next, more than a ratio may err. So at each round trip but 0 a second proxy that adds no delay runs
beside the first, and each run of the engine, verify_embeddings, embedding_status and the contract
through the delaying proxy follows one through it: a ratio is of two medians taken in the same
minutes, not of figures taken minutes apart.

Each round trip works on fresh databases, copied from two templates the suite builds first, next
to the database (`CREATE DATABASE ... TEMPLATE`): one with the engine's segments at phase 1, one
with `--remote-switch-rows` segments embedded by the suite's model, the HNSW index built. Its model
is EMBEDDING_MODEL when it loads here, else the packaged all-MiniLM-L6-v2 (it says which). The
databases are the suite's own, on the same server, dropped at its end; the live tables are not read.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import psycopg2
from django.conf import settings
from django.db import connections
from psycopg2 import errors

from askdrchaffee.postgres import quote_ident
from benchmark.arrival import child_database
from benchmark.delay_proxy import ProxyProcess, measure_added_ms
from benchmark.measure import percentile_ms

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUND_TRIPS = (0.0, 25.0, 50.0, 100.0)
DEFAULT_ENGINE_ROWS = 20_000
DEFAULT_ENGINE_RUNS = 3  # runs of the engine at each round trip (and as many beside them through the reference)
DEFAULT_SWITCH_ROWS = 5_000
DEFAULT_ARRIVALS = 100
DEFAULT_ARRIVAL_RATE = 10.0
DEFAULT_APP_RATE = 20.0
COMMAND_SECONDS = 900  # the longest one step may take before the suite gives up on it
TEMPLATE_WAIT_SECONDS = 10  # for the sessions of a command that just exited to leave a database copied next
COMMAND_RUNS = 3  # verify_embeddings, embedding_status and the contract (on fresh copies) run this often, the median kept


class RemoteFailed(RuntimeError):
    """A step of the remote suite failed; the message says which and why."""


class Server:
    """How to reach the server the suite's databases live on, directly or through a proxy."""

    def __init__(self, using):
        self.database = child_database(using)
        host = self.database["HOST"] or "localhost"
        self.socket_dir = host if host.startswith("/") else None
        self.port = int(self.database["PORT"] or 5432)
        self.target = f"{self.socket_dir}/.s.PGSQL.{self.port}" if self.socket_dir else f"{host}:{self.port}"

    def connect(self, name, through=None):
        host, port = ("127.0.0.1", through) if through else (self.database["HOST"], self.port)
        return psycopg2.connect(host=host, port=port, dbname=name, user=self.database["USER"] or "postgres",
                                password=self.database["PASSWORD"] or None)

    def url(self, name, through=None):
        user = self.database["USER"] or "postgres"
        password = f":{self.database['PASSWORD']}" if self.database["PASSWORD"] else ""
        if through:
            return f"postgresql://{user}{password}@127.0.0.1:{through}/{name}"
        if self.socket_dir:
            return f"postgresql://{user}{password}@/{name}?host={self.socket_dir}&port={self.port}"
        return f"postgresql://{user}{password}@{self.database['HOST']}:{self.port}/{name}"

    def create(self, name, template=None):
        """Database `name` made anew, a copy of `template` when given (which no session may use: a command that
        just exited may still be leaving it, through a delaying proxy; this waits up to TEMPLATE_WAIT_SECONDS)."""
        deadline = time.monotonic() + TEMPLATE_WAIT_SECONDS
        while True:
            try:
                return self._admin(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)",
                                   f"CREATE DATABASE {quote_ident(name)}"
                                   + (f" TEMPLATE {quote_ident(template)}" if template else ""))
            except errors.ObjectInUse:
                if time.monotonic() >= deadline:
                    raise RemoteFailed(f"database {template} stayed in use {TEMPLATE_WAIT_SECONDS} s, by: "
                                       f"{self.sessions(template)}") from None
                time.sleep(0.2)

    def sessions(self, name):
        """The sessions on database `name` (pid, application, state, since, query)."""
        connection = self.connect("postgres")
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pid, application_name, state, now() - backend_start, left(query, 200) "
                               "FROM pg_stat_activity WHERE datname = %s", [name])
                return cursor.fetchall()
        finally:
            connection.close()

    def drop(self, name):
        self._admin(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")

    def _admin(self, *statements):
        connection = self.connect("postgres")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            connection.close()


def manage(*args, database_url, model, env=None, timeout=COMMAND_SECONDS):
    """`manage.py *args` on `database_url` (the direct connections too); (seconds, stdout)."""
    full_env = {**os.environ, "DATABASE_URL": database_url, "DATABASE_DIRECT_URL": database_url,
                "EMBEDDING_MODEL": model, "EMBEDDING_DEVICE": "cpu", "EMBEDDING_QUERY_INSTRUCTION": "",
                "LEGACY_EMBEDDING_MODEL": settings.LEGACY_EMBEDDING_MODEL, **(env or {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):  # 3: an evaluation without enough evidence, which the swap accepts
        raise RemoteFailed(f"`{' '.join(args[-3:])}` exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return seconds, done.stdout


class Inserts(threading.Thread):
    """The application next to the database: `rate` inserts a second, each timed (by the wall clock, which
    the server shares here); and, every 5 ms on a connection of its own, whether a lock held by another
    session blocks its session (`pg_blocking_pids`)."""

    SAMPLE_SECONDS = 0.005

    def __init__(self, server, name, rate):
        super().__init__(daemon=True)
        self.server, self.name, self.interval = server, name, 1.0 / rate
        self.stop, self.times, self.errors, self.blocked = threading.Event(), [], [], []
        self.pid = None
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def run(self):
        connection = self.server.connect(self.name)
        connection.autocommit = True
        self.pid = connection.get_backend_pid()
        self.sampler.start()
        number = 0
        try:
            while not self.stop.is_set():
                number += 1
                started = time.time()
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES "
                                       "('application', %s, %s, %s)", [number, number + 1, f"live insert {number}"])
                except psycopg2.Error as exc:
                    self.errors.append(str(exc))
                self.times.append((started, time.time() - started))
                self.stop.wait(self.interval)
        finally:
            connection.close()
            self.sampler.join(5)

    def _sample(self):
        connection = self.server.connect(self.name)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                while not self.stop.is_set():
                    cursor.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", [self.pid])
                    if cursor.fetchone()[0]:
                        self.blocked.append(time.time())
                    time.sleep(self.SAMPLE_SECONDS)
        finally:
            connection.close()

    def slowest_ms(self, start, end):
        """The slowest insert begun between `start` and `end` (wall clock), in ms."""
        waits = [seconds for at, seconds in self.times if start <= at <= end]
        return round(max(waits) * 1000, 1) if waits else None

    def slowest_overlapping_ms(self, start, end):
        """The slowest insert that was running at some moment between `start` and `end`, in ms."""
        waits = [seconds for at, seconds in self.times if at <= end and at + seconds >= start]
        return round(max(waits) * 1000, 1) if waits else 0.0

    def longest_blocked_ms(self, start, end):
        """The longest stretch between `start` and `end` in which every sample found the application's
        session blocked by a lock, in ms (a stretch of one sample counts as one sampling interval)."""
        samples = [at for at in self.blocked if start <= at <= end]
        longest, first, last = 0.0, None, None
        for at in samples:
            if last is None or at - last > 3 * self.SAMPLE_SECONDS:
                first = at
            last = at
            longest = max(longest, last - first + self.SAMPLE_SECONDS)
        return round(longest * 1000, 1)


def follower_latency(server, name, through, model, count, rate):
    """The follower through the proxy, `count` arrivals inserted next to the database at `rate` a second:
    {p50_s, p95_s, max_s, embedded}."""
    env = {**os.environ, "DATABASE_URL": server.url(name, through), "DATABASE_DIRECT_URL": server.url(name, through),
           "EMBEDDING_MODEL": model, "EMBEDDING_DEVICE": "cpu", "EMBEDDING_QUERY_INSTRUCTION": "",
           "PYTHONUNBUFFERED": "1"}
    follower = subprocess.Popen([sys.executable, "manage.py", "backfill_embeddings", "--follow"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(follower, "Following")
        time.sleep(1.0)  # its first look is over: it waits for arrivals
        return _arrivals(server, name, count, rate)
    finally:
        follower.send_signal(signal.SIGTERM)
        try:
            follower.wait(15)
        except subprocess.TimeoutExpired:
            follower.kill()


def _wait_for_line(process, start, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if start in line:
            return
        if not line and process.poll() is not None:
            raise RemoteFailed(f"the follower exited {process.returncode} before saying {start!r}")
    raise RemoteFailed(f"the follower did not say {start!r} within {seconds} s")


def _arrivals(server, name, count, rate):
    connection = server.connect(name)
    connection.autocommit = True
    committed, embedded = {}, {}
    try:
        with connection.cursor() as cursor:
            for number in range(count):
                cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES ('arrival', %s, %s, %s) "
                               "RETURNING id", [number, number + 1, f"arrival {number}: fasting, ketones and sleep"])
                committed[cursor.fetchone()[0]] = time.perf_counter()
                _seen(cursor, committed, embedded)
                time.sleep(1.0 / rate)
            deadline = time.monotonic() + 30
            while len(embedded) < count and time.monotonic() < deadline:
                _seen(cursor, committed, embedded)
                time.sleep(0.01)
    finally:
        connection.close()
    latencies = [embedded[i] - committed[i] for i in embedded]
    return {"arrivals": count, "embedded": len(embedded),
            "p50_s": round(percentile_ms(latencies, 50) / 1000, 3) if latencies else None,
            "p95_s": round(percentile_ms(latencies, 95) / 1000, 3) if latencies else None,
            "max_s": round(max(latencies), 3) if latencies else None}


def _seen(cursor, committed, embedded):
    waiting = [i for i in committed if i not in embedded]
    if waiting:
        cursor.execute("SELECT id FROM segments WHERE id = ANY(%s) AND embedding_384 IS NOT NULL", [waiting])
        now = time.perf_counter()
        for (segment_id,) in cursor.fetchall():
            embedded[segment_id] = now


def switch_steps(server, name, through, model, app_rate, reference=None):
    """verify, status, swap and undo under the application's inserts, swap again, contract: their figures.
    verify and status run COMMAND_RUNS times, the median kept; with `reference` (the port of a proxy that adds
    no delay) each run follows one through it, whose median is kept beside."""
    url = server.url(name, through)
    figures = {}
    for key, args in (("verify", ("verify_embeddings", "--recall-seconds", "5")), ("status", ("embedding_status",))):
        far, near = [], []
        for _ in range(COMMAND_RUNS):
            if reference is not None:
                near.append(manage("manage.py", *args, database_url=server.url(name, reference), model=model)[0])
            far.append(manage("manage.py", *args, database_url=url, model=model)[0])
        figures[f"{key}_s"], figures[f"{key}_runs_s"] = statistics.median(far), [round(s, 2) for s in far]
        if near:
            figures[f"{key}_reference_s"] = statistics.median(near)
            figures[f"{key}_reference_runs_s"] = [round(s, 2) for s in near]
    app = Inserts(server, name, app_rate)
    app.start()
    try:
        for step in ("swap", "undo"):
            started = time.time()
            seconds, _ = manage("manage.py", "embedding_switch", step, "--json", database_url=url, model=model)
            ended = time.time()
            held_from, held_ms = _writes_held(server, name, step)
            figures[step] = {
                "command_s": round(seconds, 2),
                "app_slowest_insert_ms": app.slowest_ms(started, ended),
                "app_slowest_insert_while_writes_held_ms": app.slowest_overlapping_ms(held_from, held_from + held_ms / 1000),
                "app_longest_blocked_by_a_lock_ms": app.longest_blocked_ms(started, ended),
                "writes_held_ms_by_the_server": held_ms,
            }
    finally:
        app.stop.set()
        app.join(10)
    if app.errors:
        raise RemoteFailed(f"the application's inserts failed during the swap: {app.errors[:3]}")
    manage("manage.py", "embedding_switch", "swap", database_url=url, model=model)
    figures.update(contract_runs(server, name, through, model, reference))
    return figures


def contract_runs(server, name, through, model, reference=None):
    """`embedding_switch contract --confirm` COMMAND_RUNS times through the proxy at port `through`, each on a
    fresh copy of database `name` as it is now (swapped), and with `reference` each following one through it
    on a copy of its own: the medians, and every run's time. `name` is left contracted."""
    swapped = f"{name}_swapped"
    server.create(swapped, template=name)
    far, near = [], []
    try:
        for _ in range(COMMAND_RUNS):
            for port, runs in ((reference, near), (through, far)):
                if port is None:
                    continue
                server.create(name, template=swapped)
                runs.append(manage("manage.py", "embedding_switch", "contract", "--confirm",
                                   database_url=server.url(name, port), model=model)[0])
    finally:
        server.drop(swapped)
    figures = {"contract_s": statistics.median(far), "contract_runs_s": [round(s, 2) for s in far]}
    if near:
        figures["contract_reference_s"] = statistics.median(near)
        figures["contract_reference_runs_s"] = [round(s, 2) for s in near]
    return figures


def _writes_held(server, name, step):
    """(when, by the server's clock, in seconds since the epoch; for how many ms) the last `step` (the
    swap or the undo) held the application's writes, from its SwitchEvent."""
    connection = server.connect(name)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT extract(epoch FROM (details->>'writes_held_from')::timestamptz), "
                           "(details->>'writes_blocked_ms')::float FROM segments_switch_event WHERE step = %s "
                           "ORDER BY id DESC LIMIT 1", [step])
            held_from, held_ms = cursor.fetchone()
    finally:
        connection.close()
    return float(held_from), held_ms


def engine(server, name, through, rate, proxy, repeats=1, reference=None, fresh=lambda: None):
    """The engine's runs through the proxy (each encoder's median of `repeats`), and the bytes each row sent
    each way (all its runs together). With `reference` (the port of a proxy that adds no delay), each run
    through the proxy follows one through the reference, and each encoder's figures carry the reference's
    median: the ratio of a pair of figures taken side by side, not minutes apart. `fresh()` makes the
    engine's database anew before each (a run leaves the table's dead row versions to the next)."""
    far, near, forwarded, rows = {}, {}, [0, 0], 0
    for _ in range(repeats):
        if reference is not None:
            fresh()
            for key, run in _engine_runs(server, name, reference, rate).items():
                near.setdefault(key, []).append(run)
        fresh()
        before = proxy.forwarded()
        for key, run in _engine_runs(server, name, through, rate).items():
            far.setdefault(key, []).append(run)
            rows += run["rows"]
        forwarded = [total + after - first for total, after, first in zip(forwarded, proxy.forwarded(), before)]
    runs = {}
    for key, each in far.items():
        runs[key] = {**_median(each), "runs_rows_per_s": [run["rows_per_s"] for run in each]}
        if key in near:
            runs[key]["reference_rows_per_s"] = _median(near[key])["rows_per_s"]
            runs[key]["reference_runs_rows_per_s"] = [run["rows_per_s"] for run in near[key]]
    runs["bytes_per_row"] = {"up": round(forwarded[0] / rows), "down": round(forwarded[1] / rows)} if rows else None
    return runs


def _median(runs):
    """The run of median pass."""
    return sorted(runs, key=lambda run: run["pass_seconds"])[len(runs) // 2]


def _engine_runs(server, name, through, rate):
    env = {**os.environ, "DATABASE_URL": server.url(name, through), "DATABASE_DIRECT_URL": server.url(name, through)}
    done = subprocess.run([sys.executable, "-m", "benchmark.remote_child", "engine", "--simulated-gpu-rate", str(rate)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    if done.returncode != 0:
        raise RemoteFailed(f"the engine's runs failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_template(server, name, rows, embed, model):
    server.create(name)
    args = ["-m", "benchmark.remote_child", "build", "--rows", str(rows)] + (["--embed"] if embed else [])
    manage(*args, database_url=server.url(name), model=model)


def one_round_trip(ctx, server, names, round_trip, model):
    options = ctx.options
    with ProxyProcess(server.target, round_trip / 2) as proxy, \
            (ProxyProcess(server.target, 0) if round_trip else nullcontext()) as reference:
        server.create(names["switch"], template=names["switch_template"])
        through, direct = proxy.port, server.connect
        proxied_ms, direct_ms = measure_added_ms(lambda: direct(names["switch"]),
                                                 lambda: server.connect(names["switch"], through))
        ctx.progress(f"remote: round trip {round_trip:g} ms (measured {proxied_ms:.1f} ms through the proxy, "
                     f"{direct_ms:.2f} direct): the engine")
        figures = {"asked_ms": round_trip, "measured_ms": round(proxied_ms, 1), "direct_ms": round(direct_ms, 2),
                   "engine": engine(server, names["engine"], through, options.simulated_gpu_rate, proxy,
                                    options.remote_engine_runs, reference.port if reference else None,
                                    fresh=lambda: server.create(names["engine"], template=names["engine_template"]))}
        ctx.progress(f"remote: round trip {round_trip:g} ms: the follower")
        figures["follower"] = follower_latency(server, names["switch"], through, model, options.remote_arrivals,
                                               options.remote_arrival_rate)
        ctx.progress(f"remote: round trip {round_trip:g} ms: verify, status, swap, undo, contract")
        figures.update(switch_steps(server, names["switch"], through, model, options.remote_app_rate,
                                    reference.port if reference else None))
    return figures


def _ratios(runs):
    """Each figure at each round trip against its value at round trip 0: the reference taken beside it
    through a proxy that adds no delay where there is one, else the run at round trip 0."""
    base = runs[0]
    ratios = []
    for run in runs:
        engine, first = run["engine"], base["engine"]
        ratios.append({
            "asked_ms": run["asked_ms"],
            **{f"engine_{key}": engine[key]["rows_per_s"] / engine[key].get("reference_rows_per_s",
                                                                             first[key]["rows_per_s"])
               for key in ("simulated_gpu", "zero_cost")},
            "contract": run["contract_s"] / run.get("contract_reference_s", base["contract_s"]),
            "verify": run["verify_s"] / run.get("verify_reference_s", base["verify_s"]),
            "status": run["status_s"] / run.get("status_reference_s", base["status_s"]),
        })
    return ratios


def lock_wait(step):
    """The application's wait the step's lock caused (ms): the slowest insert running while the server held
    the writes, or the longest its session was seen blocked by a lock, whichever is longer."""
    return max(step.get("app_slowest_insert_while_writes_held_ms") or 0.0, step.get("app_longest_blocked_by_a_lock_ms") or 0.0)


def targets(runs, ratios):
    """The targets of the remote suite, each True or False (a round trip the run did not measure: absent)."""
    by_rtt = {run["asked_ms"]: (run, ratio) for run, ratio in zip(runs, ratios)}
    found = {}
    if 100.0 in by_rtt:
        run, ratio = by_rtt[100.0]
        found["engine_at_100ms_at_least_0.8x_round_trip_0"] = ratio["engine_simulated_gpu"] >= 0.8
        found["application_waits_at_most_30ms_during_swap_and_undo_from_100ms"] = max(
            run["swap"]["app_slowest_insert_ms"], run["undo"]["app_slowest_insert_ms"]) <= 30
        found["application_waits_for_the_lock_at_most_30ms_during_swap_and_undo_from_100ms"] = max(
            lock_wait(run["swap"]), lock_wait(run["undo"])) <= 30
    if 50.0 in by_rtt:
        run, ratio = by_rtt[50.0]
        found["follower_p95_at_most_0.35s_at_50ms"] = (run["follower"]["p95_s"] or 99) <= 0.35 and \
            run["follower"]["embedded"] == run["follower"]["arrivals"]
        found["contract_at_50ms_at_most_1.5x"] = ratio["contract"] <= 1.5
        found["verify_and_status_at_50ms_at_most_2x"] = ratio["verify"] <= 2 and ratio["status"] <= 2
    return found


def run(ctx):
    """The suite's figures: one entry a round trip, the ratios to round trip 0, the targets."""
    from benchmark.arrival import choose_model

    options = ctx.options
    chosen = choose_model(options)
    model = chosen.name if chosen.encoder != "hashing" else None
    if model is None:
        raise RemoteFailed("the remote suite runs the real commands: it needs a model (not --arrival-encoder hashing)")
    server = Server(options.using)
    base = connections[options.using].settings_dict["NAME"]
    names = {key: f"{base}_remote_{key}" for key in ("engine", "switch", "engine_template", "switch_template")}
    round_trips = sorted(set((0.0, *options.remote_round_trips)))
    try:
        ctx.progress(f"remote: building the engine's table ({options.remote_engine_rows:,} segments)")
        build_template(server, names["engine_template"], options.remote_engine_rows, False, model)
        ctx.progress(f"remote: building the switch's table ({options.remote_switch_rows:,} segments, embedded by "
                     f"{chosen.label})")
        build_template(server, names["switch_template"], options.remote_switch_rows, True, model)
        runs = [one_round_trip(ctx, server, names, round_trip, model) for round_trip in round_trips]
    finally:
        for name in names.values():
            server.drop(name)
    ratios = _ratios(runs)
    return {"model": chosen.label, "model_chosen": chosen.chosen, "engine_rows": options.remote_engine_rows,
            "engine_runs": options.remote_engine_runs,
            "switch_rows": options.remote_switch_rows, "simulated_gpu_texts_per_s": options.simulated_gpu_rate,
            "app_inserts_per_s": options.remote_app_rate, "round_trips": runs, "ratios": ratios,
            "targets": targets(runs, ratios)}
