"""`manage.py embedding_benchmark`: the options, checked before any work; the suites are in the
`benchmark` package (runner.py), the figures and how to read them in docs/benchmark.md."""
import importlib.util
import json
import re
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from benchmark import report
from benchmark.arrival import ArrivalFailed
from benchmark.live_site import LiveSiteFailed
from benchmark.remote import RemoteFailed
from benchmark.encode import CPU_TEXTS_PER_CALL_CANDIDATES, CUDA_TEXTS_PER_CALL_CANDIDATES
from benchmark.encoders import SHAPES, BenchmarkModelUnavailable
from benchmark.interrupts import Terminated
from benchmark.runner import DEFAULT_SUITES, DEFAULT_TEXTS, DEFAULT_TEXTS_CPU, SUITES, Options, run
from benchmark.search import SEARCH_TYPES
from benchmark.search_sets import VECTOR_SOURCES, SearchVectorsUnavailable
from segments.schema import SchemaNotReady

MAX_EF_SEARCH = 1000  # pgvector's limit for hnsw.ef_search


def positive_ints(raw):
    """'16,32,64' -> (16, 32, 64); argparse turns the ValueError into a usage error."""
    values = tuple(int(part) for part in raw.split(",") if part.strip())
    if not values or min(values) < 1:
        raise ValueError(raw)
    return values


MEMORY_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}


def memory_size(raw):
    """'2GB' -> bytes (kB, MB, GB or TB, at least 1MB: maintenance_work_mem's least)."""
    match = re.fullmatch(r"\s*(\d+)\s*(kB|MB|GB|TB)\s*", raw, flags=re.IGNORECASE)
    if match is None or int(match[1]) * MEMORY_UNITS[match[2].lower()] < 2**20:
        raise ValueError(raw)
    return int(match[1]) * MEMORY_UNITS[match[2].lower()]


def type_names(raw):
    """'vector,halfvec' -> ('vector', 'halfvec'), each a pgvector type the search suite knows."""
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not names or set(names) - set(SEARCH_TYPES):
        raise ValueError(raw)
    return names


def round_trips_ms(raw):
    """'0,25,50,100' -> (0.0, 25.0, 50.0, 100.0): round trips in ms, each from 0 to 1000."""
    values = tuple(float(part) for part in raw.split(",") if part.strip())
    if not values or min(values) < 0 or max(values) > 1000:
        raise ValueError(raw)
    return values


round_trips_ms.__name__ = "list of round trips in ms (such as 0,25,50,100)"


def _listed(values):
    return ",".join(str(value) for value in values)


class Command(BaseCommand):
    help = ("Measure encoding, vector writes, the backfill, search and reranking side by side on this machine; "
            "with --suite arrival, how soon an arriving segment has its vector.")
    stealth_options = ("arrival_encoder",)  # tests: "hashing" runs the arrival suite without a model

    def add_arguments(self, parser):
        parser.add_argument("--suite", action="append", choices=list(SUITES), dest="suites",
                            help="Suite to run; repeat for several (default: all but arrival).")
        parser.add_argument("--rows", type=int, default=Options.rows,
                            help=f"Rows in the scratch tables: db-write, the backfill suite's production runs, search "
                                 f"(default {Options.rows:,}).")
        parser.add_argument("--texts", type=int,
                            help="Texts run through the model: encode, the backfill's model run, rerank candidates "
                                 f"(default {DEFAULT_TEXTS_CPU} on a CPU, {DEFAULT_TEXTS['cuda']} on CUDA).")
        parser.add_argument("--texts-per-call", type=positive_ints, metavar="N,N,...",
                            help="Texts per model call of the encode sweep (default "
                                 f"{_listed(CPU_TEXTS_PER_CALL_CANDIDATES)} on a CPU, "
                                 f"{_listed(CUDA_TEXTS_PER_CALL_CANDIDATES)} on CUDA).")
        parser.add_argument("--batch-size", type=int, dest="backfill_batch_size", metavar="N",
                            help="Rows per backfill engine batch in the backfill suite (default: the engine's, fewer for a small run).")
        parser.add_argument("--simulated-gpu-rate", type=float, default=Options.simulated_gpu_rate,
                            metavar="TEXTS_PER_S",
                            help="Texts/s of the backfill suite's simulated GPU (default "
                                 f"{Options.simulated_gpu_rate:,.0f}).")
        parser.add_argument("--model-shape", choices=list(SHAPES),
                            help="Benchmark a randomly initialised model of this shape instead of EMBEDDING_MODEL "
                                 "(real speed, meaningless vectors).")
        parser.add_argument("--ef-search", type=positive_ints, metavar="N,N,...", default=Options.ef_search,
                            help="hnsw.ef_search values of the search sweep.")
        parser.add_argument("--queries", type=int, default=Options.queries,
                            help=f"Queries per ef_search value (default {Options.queries}).")
        parser.add_argument("--search-vectors", choices=VECTOR_SOURCES, default="auto",
                            help="Vectors of the search table: the live table's, derived from real ones (the model "
                                 "over --derive-base texts), hashed words, hashed texts (random), or the model's "
                                 "(default auto: live if there are enough, else words).")
        parser.add_argument("--search-types", type=type_names, metavar="TYPE,TYPE", default=Options.search_types,
                            help=f"pgvector types the search suite compares (default {_listed(SEARCH_TYPES)}).")
        parser.add_argument("--derive-base", type=int, default=Options.derive_base, metavar="N",
                            help=f"Real vectors the derived search vectors come from (default {Options.derive_base:,}; "
                                 "embedded once, then cached).")
        parser.add_argument("--check-derived", action="store_true",
                            help="With --search-vectors derived: compare the recall curves of derived and real "
                                 "vectors at --derive-base rows.")
        parser.add_argument("--vector-cache", type=Path, metavar="DIR",
                            help="Folder caching the embedded base texts (default .benchmark-cache/).")
        parser.add_argument("--index-memory", type=memory_size, metavar="SIZE",
                            help="maintenance_work_mem of the search suite's HNSW builds, such as 3GB (default: as "
                                 "the live build would plan it for the table's size).")
        parser.add_argument("--index-workers", type=int, metavar="N",
                            help="max_parallel_maintenance_workers of those builds (default: as the live build "
                                 "would plan it).")
        parser.add_argument("--max-scan-tuples", type=int, default=Options.max_scan_tuples, metavar="N",
                            help=f"hnsw.max_scan_tuples of the filtered searches' iterative scans (default "
                                 f"{Options.max_scan_tuples:,}, pgvector's).")
        parser.add_argument("--arrival-rate", type=float, default=Options.arrival_rate, metavar="PER_S",
                            help="Arrival suite: segments arriving per second, inserts and text edits in turn, each "
                                 f"its own transaction (default {Options.arrival_rate:g}).")
        parser.add_argument("--arrival-seconds", type=float, default=Options.arrival_seconds, metavar="S",
                            help=f"Arrival suite: how long they arrive (default {Options.arrival_seconds:g}).")
        parser.add_argument("--arrival-grace", type=float, default=Options.arrival_grace, metavar="S",
                            help="Arrival suite: how long after the last arrival each side may take for the last "
                                 f"vectors before they count as missing (default {Options.arrival_grace:g}).")
        parser.add_argument("--arrival-model", metavar="MODEL",
                            help="Arrival suite: the model (a Hugging Face id or a directory; default "
                                 "EMBEDDING_MODEL when it loads here, else the packaged all-MiniLM-L6-v2).")
        parser.add_argument("--arrival-device", default=Options.arrival_device,
                            help=f"Arrival suite: the model's device (default {Options.arrival_device}).")
        parser.add_argument("--live-seconds", type=float, default=Options.live_seconds, metavar="S",
                            help="Live-site suite: how long the application runs in each phase (alone, beside an "
                                 f"unthrottled backfill, beside a throttled one; default {Options.live_seconds:g}).")
        parser.add_argument("--live-rate-cap", type=float, default=Options.live_rate_cap, metavar="ROWS_PER_S",
                            help="Live-site suite: the throttled backfill's --max-rows-per-second (default "
                                 f"{Options.live_rate_cap:,g}).")
        parser.add_argument("--live-ops", type=float, default=Options.live_ops, metavar="PER_S",
                            help="Live-site suite: the application's rounds a second, each a read by id, a search "
                                 f"and an insert (default {Options.live_ops:g}).")
        parser.add_argument("--remote-round-trips", type=round_trips_ms, default=Options.remote_round_trips,
                            metavar="MS,MS", help="Remote suite: the round trips the delay proxy adds (default "
                            f"{_listed(int(v) for v in Options.remote_round_trips)}; 0 is always run, the reference).")
        parser.add_argument("--remote-engine-rows", type=int, default=Options.remote_engine_rows, metavar="N",
                            help=f"Remote suite: segments the engine embeds (default {Options.remote_engine_rows:,}).")
        parser.add_argument("--remote-engine-runs", type=int, default=Options.remote_engine_runs, metavar="N",
                            help="Remote suite: runs of the engine with each encoder at each round trip, the median "
                                 f"kept (default {Options.remote_engine_runs}).")
        parser.add_argument("--remote-switch-rows", type=int, default=Options.remote_switch_rows, metavar="N",
                            help="Remote suite: segments of the table verified, swapped and contracted (default "
                                 f"{Options.remote_switch_rows:,}).")
        parser.add_argument("--remote-arrivals", type=int, default=Options.remote_arrivals, metavar="N",
                            help=f"Remote suite: segments the follower embeds (default {Options.remote_arrivals}).")
        parser.add_argument("--remote-arrival-rate", type=float, default=Options.remote_arrival_rate, metavar="PER_S",
                            help=f"Remote suite: arrivals a second (default {Options.remote_arrival_rate:g}).")
        parser.add_argument("--remote-app-rate", type=float, default=Options.remote_app_rate, metavar="PER_S",
                            help="Remote suite: the application's inserts a second during the swap and the undo "
                                 f"(default {Options.remote_app_rate:g}).")
        parser.add_argument("--seed", type=int, default=0, help="Seed of every random choice (default 0).")
        parser.add_argument("--database", default="default", help="Database alias (default 'default').")
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
        parser.add_argument("--plot", type=Path, metavar="FILE.png",
                            help="Draw throughput against texts per call and recall against latency into FILE.png "
                                 "(the remote suite run alone: each step's cost against the round trip).")
        parser.add_argument("--compare", type=Path, metavar="OLD.json",
                            help="Show the change against an earlier run's --json output.")

    def handle(self, *args, **options):
        benchmark = self.validated(options)
        earlier = self.read_earlier(options["compare"])
        if options["plot"] and not options["plot"].parent.is_dir():
            raise CommandError(f"--plot {options['plot']}: the folder {options['plot'].parent} does not exist.")
        if options["plot"] and importlib.util.find_spec("matplotlib") is None:
            raise CommandError("--plot draws with matplotlib, which the development requirements install: "
                               "`pip install -r requirements-dev.txt`.")
        progress = self.progress if options["verbosity"] >= 1 and not options["json"] else (lambda message: None)
        results = self.run(benchmark, progress)
        if options["plot"]:
            from benchmark.plot import draw

            draw(results, options["plot"])
        self.report(results, earlier, options)

    def validated(self, options):
        for name, minimum in (("rows", 10), ("texts", 1), ("backfill_batch_size", 1), ("queries", 1),
                              ("simulated_gpu_rate", 1)):
            if options[name] is not None and options[name] < minimum:
                raise CommandError(f"--{name.replace('backfill_', '').replace('_', '-')} must be at least {minimum}.")
        for name, minimum in (("derive_base", 2), ("index_workers", 0), ("max_scan_tuples", 1), ("arrival_grace", 0)):
            if options[name] is not None and options[name] < minimum:
                raise CommandError(f"--{name.replace('_', '-')} must be at least {minimum}.")
        if options["remote_engine_runs"] < 1:
            raise CommandError("--remote-engine-runs must be at least 1.")
        for name in ("remote_engine_rows", "remote_switch_rows", "remote_arrivals"):
            if options[name] < 10:
                raise CommandError(f"--{name.replace('_', '-')} must be at least 10.")
        for name in ("arrival_rate", "arrival_seconds", "live_seconds", "live_rate_cap", "live_ops",
                     "remote_arrival_rate", "remote_app_rate"):
            if options[name] <= 0:
                raise CommandError(f"--{name.replace('_', '-')} must be more than 0.")
        if max(options["ef_search"]) > MAX_EF_SEARCH:
            raise CommandError(f"--ef-search values must be at most {MAX_EF_SEARCH} (pgvector's limit).")
        if options["check_derived"] and options["search_vectors"] != "derived":
            raise CommandError("--check-derived compares derived vectors with real ones: add --search-vectors derived.")
        if options["search_vectors"] == "derived" and options["model_shape"]:
            raise CommandError("--search-vectors derived needs the model's real vectors, and --model-shape gives "
                               "meaningless ones: drop --model-shape (set EMBEDDING_MODEL to a model that loads here).")
        suites = options["suites"] or list(DEFAULT_SUITES)
        return Options(
            suites=tuple(name for name in SUITES if name in suites), rows=options["rows"], texts=options["texts"],
            texts_per_call=options["texts_per_call"], backfill_batch_size=options["backfill_batch_size"],
            model_shape=options["model_shape"], simulated_gpu_rate=options["simulated_gpu_rate"],
            ef_search=options["ef_search"], queries=options["queries"],
            search_vectors=options["search_vectors"], search_types=options["search_types"],
            derive_base=options["derive_base"], check_derived=options["check_derived"],
            vector_cache=str(options["vector_cache"]) if options["vector_cache"] else None,
            index_memory=options["index_memory"], index_workers=options["index_workers"],
            max_scan_tuples=options["max_scan_tuples"], arrival_rate=options["arrival_rate"],
            arrival_seconds=options["arrival_seconds"], arrival_grace=options["arrival_grace"],
            arrival_model=options["arrival_model"], arrival_device=options["arrival_device"],
            arrival_encoder=options.get("arrival_encoder"), live_seconds=options["live_seconds"],
            live_rate_cap=options["live_rate_cap"], live_ops=options["live_ops"],
            remote_round_trips=options["remote_round_trips"], remote_engine_rows=options["remote_engine_rows"],
            remote_engine_runs=options["remote_engine_runs"],
            remote_switch_rows=options["remote_switch_rows"], remote_arrivals=options["remote_arrivals"],
            remote_arrival_rate=options["remote_arrival_rate"], remote_app_rate=options["remote_app_rate"],
            seed=options["seed"],
            using=options["database"],
        )

    @staticmethod
    def read_earlier(path):
        if path is None:
            return None
        try:
            earlier = json.loads(path.read_text())
        except OSError as exc:
            raise CommandError(f"--compare {path}: cannot read it ({exc.strerror}).") from None
        except ValueError:
            raise CommandError(f"--compare {path}: not JSON. Give it a file written by `embedding_benchmark "
                               "--json > FILE.json`.") from None
        if not isinstance(earlier, dict) or "machine" not in earlier:
            raise CommandError(f"--compare {path}: not an embedding_benchmark --json result.")
        return earlier

    def progress(self, message):
        self.stderr.write(f"... {message}", style_func=self.style.NOTICE)

    @staticmethod
    def run(benchmark, progress):
        try:
            return run(benchmark, progress)
        except (BenchmarkModelUnavailable, SchemaNotReady, SearchVectorsUnavailable, ArrivalFailed,
                LiveSiteFailed, RemoteFailed) as exc:
            raise CommandError(str(exc)) from None
        except ImproperlyConfigured as exc:
            raise CommandError(f"{exc} Fix the setting, or pass --model-shape bge-small.") from None
        except Terminated:
            raise CommandError("Interrupted by SIGTERM; the scratch schema was removed.", returncode=143) from None
        except KeyboardInterrupt:
            raise CommandError("Interrupted; the scratch schema was removed.", returncode=130) from None

    def report(self, results, earlier, options):
        if earlier is not None:
            results["compare"] = report.compare(earlier, results)
        if options["json"]:
            self.stdout.write(json.dumps(results, indent=2))
            return
        for line in report.render(results):
            self.stdout.write(line)
        if earlier is not None:
            self.stdout.write("")
            for line in report.render_comparison(earlier, results):
                self.stdout.write(line)
        if options["plot"]:
            self.stdout.write(self.style.SUCCESS(f"Plot written to {options['plot']}."))
