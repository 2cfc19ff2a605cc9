"""Runs the selected suites side by side in one scratch schema and gathers their figures.

    results = run(Options(suites=("encode", "search"), rows=10_000, model_shape="bge-small"))

`results` has one key per suite run (`encode`, `db_write`, `backfill`, `search`, `rerank`,
`arrival`, `live_site`, `remote`), plus `machine` (what it ran on) and `run` (the options, when, how
long). Everything is measured in the same run because absolute times on shared machines drift:
compare ratios taken together. The arrival, live-site and remote suites run only when asked for
(`--suite arrival`, `--suite live-site`, `--suite remote`): they take minutes of wall time, most of
it waiting on the clock.
"""
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from benchmark import (
    arrival, backfill, db_write, encode, encoders, filtered, interrupts, live_site, machine, remote, rerank, scratch,
    search,
)
from benchmark import source as sources

# Suite name (for --suite) -> (JSON key, the suite's run function).
SUITES = {
    "encode": ("encode", encode.run),
    "db-write": ("db_write", db_write.run),
    "backfill": ("backfill", backfill.run),
    "search": ("search", search.run),
    "rerank": ("rerank", rerank.run),
    "arrival": ("arrival", arrival.run),
    "live-site": ("live_site", live_site.run),
    "remote": ("remote", remote.run),
}
# Run when none is named; arrival, live-site and remote wait for the clock (minutes), and run when named.
DEFAULT_SUITES = tuple(name for name in SUITES if name not in ("arrival", "live-site", "remote"))
NEEDS_EMBEDDING_MODEL = {"encode", "backfill", "search"}
DEFAULT_TEXTS = {"cuda": 8192}
DEFAULT_TEXTS_CPU = 192


def default_texts(device):
    return DEFAULT_TEXTS.get(device, DEFAULT_TEXTS_CPU)


@dataclass
class Options:
    suites: tuple = DEFAULT_SUITES
    rows: int = 100_000  # size of the scratch tables (db-write, the backfill's fake-encoder run, search)
    texts: int | None = None  # texts run through the model (encode, the backfill's model run, rerank)
    texts_per_call: tuple | None = None  # the encode sweep's texts per model call; None: by device
    backfill_batch_size: int | None = None  # rows per engine claim; None: the engine's DEFAULT_BATCH_SIZE
    simulated_gpu_rate: float = 20_000  # texts/s of the backfill suite's simulated GPU
    model_shape: str | None = None
    ef_search: tuple = search.DEFAULT_EF_SEARCH
    queries: int = 200
    search_vectors: str = "auto"
    search_types: tuple = search.SEARCH_TYPES  # the pgvector types the search suite compares
    derive_base: int = 8_000  # real vectors the derived search vectors come from
    check_derived: bool = False  # compare derived vectors' recall curve with real ones'
    vector_cache: str | None = None  # where embedded base texts are cached; None: derived.default_cache()
    index_memory: int | None = None  # maintenance_work_mem of the search suite's HNSW builds, bytes; None: planned
    index_workers: int | None = None  # max_parallel_maintenance_workers of those builds; None: planned
    max_scan_tuples: int = filtered.DEFAULT_MAX_SCAN_TUPLES  # hnsw.max_scan_tuples of the iterative scans
    arrival_rate: float = arrival.DEFAULT_RATE  # segments arriving per second (inserts and text edits in turn)
    arrival_seconds: float = arrival.DEFAULT_SECONDS  # how long they arrive
    arrival_grace: float = arrival.DEFAULT_GRACE  # how long after that each side may take for the last vectors
    arrival_model: str | None = None  # None: EMBEDDING_MODEL when it loads here, else the packaged MiniLM
    arrival_device: str = "cpu"
    arrival_encoder: str | None = None  # "hashing": the zero-cost HashingEncoder instead of a model (tests)
    live_seconds: float = live_site.DEFAULT_SECONDS  # each live-site phase's window
    live_rate_cap: float = live_site.DEFAULT_RATE_CAP  # the throttled backfill's rows a second
    live_ops: float = live_site.DEFAULT_OPS  # the application's rounds a second (a read, a search, an insert)
    remote_round_trips: tuple = remote.DEFAULT_ROUND_TRIPS  # ms, each made by the delay proxy
    remote_engine_rows: int = remote.DEFAULT_ENGINE_ROWS
    remote_engine_runs: int = remote.DEFAULT_ENGINE_RUNS  # each encoder's runs at each round trip (the median kept)
    remote_switch_rows: int = remote.DEFAULT_SWITCH_ROWS
    remote_arrivals: int = remote.DEFAULT_ARRIVALS
    remote_arrival_rate: float = remote.DEFAULT_ARRIVAL_RATE
    remote_app_rate: float = remote.DEFAULT_APP_RATE  # the application's inserts a second during the swap
    seed: int = 0
    using: str = "default"


@dataclass
class Context:
    """What a suite needs: the options, the scratch schema, the model, shared inputs (made once)."""

    options: Options
    scratch: scratch.Scratch
    service: object  # the EmbeddingsService benchmarked, None when no suite needs one
    device: str
    column: sources.VectorColumn
    progress: object = None  # progress(message): a line for the user while the run goes on
    arrival_model: object = None  # the arrival suite's ArrivalModel, chosen before any work
    _texts: object = field(default=None, repr=False)
    _source: object = field(default=None, repr=False)
    _legacy_source: object = field(default=None, repr=False)

    @property
    def texts_count(self):
        return self.options.texts or default_texts(self.device)

    @property
    def model_label(self):
        return encoders.model_label(self.service) if self.service is not None else None

    def texts(self):
        """The TextSample the model suites encode (sampled once per run)."""
        if self._texts is None:
            self._texts = sources.sample_texts(self.texts_count, self.options.seed, self.options.using)
        return self._texts

    def source(self):
        """The scratch `source` table every scratch copy is filled from (made once per run)."""
        if self._source is None:
            from django.db import connections

            self.progress("preparing the scratch rows")
            with connections[self.options.using].cursor() as cursor:
                rows = max(self.options.rows, self.texts_count)
                self._source = sources.fill_source(cursor, self.scratch, rows, self.options.seed)
        return self._source

    def legacy_source(self):
        """The scratch table of legacy vectors for the live-shaped copies (made once per run)."""
        if self._legacy_source is None:
            from django.db import connections

            from benchmark.shapes import fill_legacy_source

            source = self.source()
            self.progress("preparing the legacy 1536-dim vectors of the live-shaped tables")
            with connections[self.options.using].cursor() as cursor:
                self._legacy_source = fill_legacy_source(cursor, self.scratch, source, self.options.seed,
                                                         self.options.using)
        return self._legacy_source


def _run_description(options, started, seconds, dropped, service):
    description = {**asdict(options), "started_at": started.isoformat(timespec="seconds"), "seconds": seconds,
                   "scratch_leftovers_dropped": list(dropped)}
    if service is not None:
        description["model"] = encoders.model_label(service)
        description["vectors_meaningful"] = not options.model_shape
    return description


def _share_of_raw_copy(results):
    """When db-write and backfill both ran, each production backfill rate as a fraction of the raw COPY."""
    if "db_write" in results and "backfill" in results:
        raw = results["db_write"]["raw_copy_rows_per_s"]
        results["backfill"]["share_of_raw_copy"] = {
            key: figures["rows_per_s"] / raw for key, figures in results["backfill"]["production"].items()}


def run(options, progress=lambda message: None):
    """Run `options.suites`; returns the results dict. The live tables are only read."""
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    # SchemaNotReady before any model is loaded; the remote suite works on databases of its own
    column = sources.vector_column(options.using) if set(options.suites) - {"remote"} else None
    service = None
    if NEEDS_EMBEDDING_MODEL & set(options.suites):
        progress("loading the embedding model")
        service = encoders.embedding_service(options.model_shape)
    device = service.device.split(":")[0] if service is not None else encoders.default_device()
    arrival_model = arrival.choose_model(options) if "arrival" in options.suites else None
    results = {"machine": machine.describe(options.using)}
    with interrupts.sigterm_raises(), interrupts.cancel_on_interrupt(options.using), \
            scratch.scratch_schema(options.using) as schema:
        ctx = Context(options, schema, service, device, column, progress, arrival_model=arrival_model)
        for name in options.suites:
            key, suite = SUITES[name]
            results[key] = suite(ctx)
    _share_of_raw_copy(results)
    results["run"] = _run_description(options, started, time.perf_counter() - clock, schema.dropped_leftovers, service)
    return results
