"""`manage.py backfill_embeddings`: a thin adapter over segments.switch.backfill (run_backfill, and
with --follow, the Follower).

It fills the column holding EMBEDDING_MODEL's vectors for every segment lacking a current vector:
the next model's column before the swap, `embedding` after it, so the same command keeps serving
new rows later. Kill it at any moment (even `kill -9`) and run it again: it resumes where it
stopped. It refuses, writing nothing, a column that holds another model's vectors (the model ledger).

Segments created or edited during the transition, through the ORM or plain SQL, are saved
without a new vector (an edited text loses its vector through the staleness trigger): they
are pending rows. `--follow` keeps running and embeds them within a second of their commit (woken
by the table's NOTIFY; it polls behind a pooler), through the swap, the undo and the contract;
SIGTERM or SIGINT stops it within a few seconds, exit status 0.

Blank segments (empty or whitespace-only text) are never embedded and keep NULL. Texts longer
than the model's input limit (512 tokens for bge-small) are truncated by the tokenizer: only
their beginning is embedded.

On a machine with several GPUs, `--workers N` gives each worker a CUDA device of its own,
round robin over all visible devices or over those `--devices 0,1,...` names; the report shows
each worker's device and rate.

It yields to the database's health (segments/switch/throttle.py): it waits while an operator has
paused the switch (`embedding_switch pause`, on any machine), while a streaming replica is more
than --max-replica-lag seconds behind (BACKFILL_MAX_REPLICA_LAG, 2 by default), and keeps under
--max-rows-per-second; it says on one line when it starts waiting, why, and when it goes on. A
follower never holds back a small batch of arrivals: only its catch-up after a burst waits.

Exit status: 0 when every segment with text has its vector (or --limit was reached); 3 when
the run finished but quarantined segments remain without one (the message says how to list
and retry them); 1 when the run failed (the message says why and what to run).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from segments.switch.backfill import (
    DEFAULT_BATCH_SIZE, BackfillError, BackfillReport, Tuning, backfill_plan, count_pending, run_backfill,
)
from segments.switch.backfill.follow import Follower, run_until_stopped
from embeddings.devices import assign_devices, cuda_device_count, parse_devices
from embeddings.encoder import get_service
from segments.schema import SchemaNotReady, require_vector_column
from segments.switch import throttle

SUMMED = ("rows_embedded", "rows_quarantined", "rows_stale", "batches")
QUARANTINE_LEFT = 3  # exit status: finished, but quarantined segments have no vector


class Command(BaseCommand):
    help = "Embed every segment that lacks a current vector in the new 384-dim column, in resumable batches."
    stealth_options = ("encoder",)  # tests pass a fake encoder here

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                            help=f"Rows per batch (claim, encode, one write transaction). Default {DEFAULT_BATCH_SIZE}.")
        parser.add_argument("--limit", type=int, help="Stop after this many rows (per run, all workers together).")
        parser.add_argument("--workers", type=int, default=1,
                            help="Worker processes sharing the work (CPU threads are split between them; "
                                 "on several GPUs, one device each).")
        parser.add_argument("--writers", type=int, default=Tuning.writers,
                            help=f"Database sessions writing each worker's batches (default {Tuning.writers}).")
        parser.add_argument("--devices", type=_device_list, metavar="N,N,...",
                            help="CUDA devices the workers use, round robin (default: every visible one).")
        parser.add_argument("--dry-run", action="store_true",
                            help="Report what would be done, without loading the model or writing.")
        parser.add_argument("--retry-quarantined", action="store_true",
                            help="Try quarantined segments again (once each in this run).")
        parser.add_argument("--json", action="store_true", help="Print one JSON object with the results on stdout.")
        parser.add_argument("--database", default="default", help='Database alias. Default "default".')
        parser.add_argument("--follow", action="store_true",
                            help="Keep running: embed segments as they arrive or change (run it as a service).")
        parser.add_argument("--poll-seconds", type=float, default=None,
                            help="--follow: how often to look for work without a notification "
                                 "(default FOLLOW_POLL_SECONDS).")
        parser.add_argument("--max-rows-per-second", type=throttle.rows_per_second_argument, default=None,
                            metavar="N",
                            help="Write at most N rows a second, all workers together (default: no cap).")
        parser.add_argument("--max-replica-lag", type=throttle.replica_lag_argument, default=throttle.SETTING,
                            metavar="SECONDS",
                            help="Wait while a streaming replica is more than SECONDS behind (default "
                                 "BACKFILL_MAX_REPLICA_LAG, 2; off: never). `embedding_switch pause` holds it too.")

    def handle(self, *args, **options):
        self.verbosity = options["verbosity"]
        self._validate(options)
        if options["follow"]:
            return self._follow(options)  # before phase 1 too: it waits for its column, and says so
        try:
            require_vector_column(options["database"])
        except SchemaNotReady as exc:
            raise CommandError(str(exc)) from exc
        if options["dry_run"]:
            return self._dry_run(options)
        devices = self._devices(options)
        if options["workers"] > 1:
            report, extra = self._run_workers(options, devices)
        else:
            report, extra = self._run_one(options, devices[0])
        self._output(report, options, extra)
        self._check_finished(report, options)

    def _validate(self, options):
        for flag, minimum in (("batch_size", 1), ("limit", 0), ("workers", 1), ("writers", 1)):
            if options.get(flag) is not None and options[flag] < minimum:
                raise CommandError(f"--{flag.replace('_', '-')} must be at least {minimum}.")
        if options["workers"] > 1 and options.get("encoder") is not None:
            raise CommandError("--workers > 1 starts processes that load EMBEDDING_MODEL; "
                               "a custom encoder cannot be handed to them: use --workers 1.")
        if options["follow"] and (options["workers"] > 1 or options["limit"] is not None or options["json"]
                                  or options["dry_run"] or options["retry_quarantined"]):
            raise CommandError("--follow runs one worker until it is stopped: leave out --workers, --limit, --json, "
                               "--dry-run and --retry-quarantined (start more followers to share the work).")
        if options["poll_seconds"] is not None and options["poll_seconds"] <= 0:
            raise CommandError("--poll-seconds must be more than 0.")
        if options.get("devices") and options.get("encoder") is not None:
            raise CommandError("--devices places the model EMBEDDING_MODEL; a custom encoder chooses its own device: "
                               "leave --devices out.")

    def _devices(self, options):
        """The device of each worker ("cuda:N"), or [None, ...] for the configured EMBEDDING_DEVICE."""
        if options.get("encoder") is not None or (options["workers"] == 1 and not options.get("devices")):
            return [None] * options["workers"]
        count = cuda_device_count(settings.EMBEDDING_DEVICE)
        if options.get("devices") and not count:
            raise CommandError(f"--devices: no CUDA device is usable here (EMBEDDING_DEVICE="
                               f"{settings.EMBEDDING_DEVICE}, torch sees none for it): leave --devices out.")
        try:
            return assign_devices(options["workers"], count, options.get("devices"))
        except ValueError as exc:
            raise CommandError(f"--devices: {exc}: choose among those.") from exc

    # --- dry run ---------------------------------------------------------------------------

    def _dry_run(self, options):
        plan = backfill_plan(options["database"], retry_quarantined=options["retry_quarantined"])
        encoder = options.get("encoder")
        plan = {"dry_run": True, "model": getattr(encoder, "model_name", None) or settings.EMBEDDING_MODEL, **plan}
        if options["json"]:
            self.stdout.write(json.dumps(plan))
            return
        held_back = plan["rows_in_quarantine"] and not options["retry_quarantined"]
        skipped = ", skipped: retry them with --retry-quarantined" if held_back else ""
        self.stdout.write(self.style.MIGRATE_HEADING("Dry run: nothing written, no model loaded."))
        self.stdout.write(
            f"Target column: segments.{plan['column']} ({plan['dimensions']} dims, phase {plan['phase']})\n"
            f"Model: {plan['model']}\n"
            f"Would embed: {plan['rows_to_embed']} segment(s)\n"
            f"Quarantined: {plan['rows_in_quarantine']}{skipped}\n"
            f"Blank text (never embedded): {plan['rows_blank']}"
        )

    # --- following ---------------------------------------------------------------------------

    def _follow(self, options):
        """Run a Follower until SIGTERM or SIGINT; exit status 0 when stopped so."""
        encoder = options.get("encoder") or get_service(self._devices(options)[0])
        stop = threading.Event()
        follower = Follower(encoder, using=options["database"], batch_size=options["batch_size"],
                            tuning=Tuning(writers=options["writers"]), stop=stop, say=self._say,
                            poll_seconds=options["poll_seconds"] or settings.FOLLOW_POLL_SECONDS,
                            **_limits(options))
        with stopping_on_signals(stop, self._say):  # a second signal while the pass ends changes nothing
            error, ended = run_until_stopped(follower, stop)
        if error is not None:
            raise CommandError(str(error)) if isinstance(error, (ImproperlyConfigured, BackfillError)) else error
        if not ended:
            self._say("Stopped; the batch in hand was abandoned (its rows stay pending for the next follower).")
        else:
            self._say("Stopped.")

    def _say(self, line):
        """One line per event, flushed at once (a service's log reads it as it comes)."""
        self.stdout.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")
        self.stdout.flush()

    def _say_aside(self, line):
        """The same on stderr, where stdout carries the JSON."""
        self.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")
        self.stderr.flush()

    # --- one worker ------------------------------------------------------------------------

    def _run_one(self, options, device=None):
        """(report, extra): `extra` names the device the model ran on."""
        encoder = options.get("encoder")
        try:
            encoder = encoder if encoder is not None else get_service(device)
            with self._progress_bar(options) as progress:
                report = run_backfill(encoder, batch_size=options["batch_size"], limit=options["limit"],
                                      progress=progress, using=options["database"],
                                      retry_quarantined=options["retry_quarantined"],
                                      tuning=Tuning(writers=options["writers"]), **_limits(options),
                                      say=self._say_aside if options["json"] else self._say)
            return report, {"device": _device_of(encoder)}
        except ImproperlyConfigured as exc:  # DimensionMismatch, ModelUnavailable: nothing was read
            raise CommandError(str(exc)) from exc
        except BackfillError as exc:
            if exc.report is not None:
                self._output(exc.report, options, {})
            raise CommandError(str(exc)) from exc

    @contextmanager
    def _progress_bar(self, options):
        """A `progress(done, total)` callback drawing a tqdm bar on a terminal, else None."""
        if options["json"] or not self.stderr.isatty():
            yield None
            return
        # tqdm redraws with "\r": it writes to the raw stream, not through OutputWrapper (which
        # would end every write with a newline).
        bar = tqdm(total=0, unit="rows", smoothing=0.1, file=self.stderr._out)

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        try:
            yield progress
        finally:
            bar.close()

    # --- several workers -------------------------------------------------------------------

    def _run_workers(self, options, devices):
        """Start N worker processes (this command with --workers 1 --json), aggregate their reports."""
        count, using = options["workers"], options["database"]
        started = time.monotonic()
        logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(count)]
        processes = [self._start_worker(options, index, out, err, device)
                     for index, ((out, err), device) in enumerate(zip(logs, devices))]
        try:
            self._wait_for(processes, options)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
                    process.wait()
        results = [self._worker_result(index, process, out, err) for index, (process, (out, err))
                   in enumerate(zip(processes, logs))]
        report = BackfillReport(seconds=time.monotonic() - started)
        for result in results:
            for name in SUMMED:
                setattr(report, name, getattr(report, name) + result.get(name, 0))
        plan = backfill_plan(using)
        report.column = plan["column"]
        report.rows_remaining, report.rows_in_quarantine, report.rows_blank = (
            plan["rows_pending"], plan["rows_in_quarantine"], plan["rows_blank"])
        extra = {"workers": count, "rows_embedded_per_worker": [result.get("rows_embedded", 0) for result in results],
                 "per_worker": [_worker_figures(index, result, device)
                                for index, (result, device) in enumerate(zip(results, devices))]}
        failures = [result["error"] for result in results if "error" in result]
        if failures:
            self._output(report, options, extra)
            raise CommandError("\n".join(failures))
        return report, extra

    def _start_worker(self, options, index, stdout, stderr, device=None):
        share = None if options["limit"] is None else -(-options["limit"] // options["workers"])
        command = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "backfill_embeddings",
                   "--workers", "1", "--json", "--batch-size", str(options["batch_size"]),
                   "--writers", str(options["writers"]), "--database", options["database"]]
        command += ["--limit", str(share)] if share is not None else []
        command += ["--devices", device.split(":")[1]] if device else []
        command += ["--retry-quarantined"] if options["retry_quarantined"] else []
        if options["max_rows_per_second"] is not None:  # the cap is the run's: each worker takes its share
            command += ["--max-rows-per-second", repr(options["max_rows_per_second"] / options["workers"])]
        if options["max_replica_lag"] is not throttle.SETTING:
            lag = options["max_replica_lag"]
            command += ["--max-replica-lag", "off" if lag is None else repr(lag)]
        threads = str(max(1, (os.cpu_count() or 1) // options["workers"]))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        return subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=settings.BASE_DIR)

    def _wait_for(self, processes, options):
        with self._progress_bar(options) as progress:
            total = count_pending(options["database"]) if progress else 0
            while any(process.poll() is None for process in processes):
                if progress:
                    left = count_pending(options["database"])
                    total = max(total, left)
                    progress(total - left, total)
                time.sleep(1 if progress else 0.2)

    def _worker_result(self, index, process, stdout, stderr):
        """The worker's JSON report, plus "error" when it failed."""
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read().strip()
        lines = [line for line in output.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {}
        if errors and self.verbosity >= 2:
            self.stderr.write("\n".join(f"worker {index}: {line}" for line in errors.splitlines()))
        if process.returncode not in (0, QUARANTINE_LEFT) or not lines:
            result["error"] = f"worker {index} failed (exit status {process.returncode}): {errors[-2000:]}"
        return result

    # --- reporting -------------------------------------------------------------------------

    def _output(self, report, options, extra):
        if options["json"]:
            self.stdout.write(json.dumps({**report.as_dict(), **extra}))
            return
        self.stdout.write(self.style.SUCCESS(
            f"Embedded {report.rows_embedded} segment(s) into segments.{report.column} in {report.seconds:.1f} s "
            f"({report.rows_per_second:.1f} rows/s)."
        ))
        for worker in extra.get("per_worker", []):
            self.stdout.write(f"  worker {worker['worker']} on {worker['device'] or 'its default device'}: "
                              f"{worker['rows_embedded']} segment(s), {worker['rows_per_second']:.1f} rows/s")
        self.stdout.write(
            f"Quarantined by this run: {report.rows_quarantined}. Not written because the text changed "
            f"meanwhile (embedded again): {report.rows_stale}.\n"
            f"Left without a vector: {report.rows_remaining} ({report.rows_in_quarantine} quarantined). "
            f"Blank text (never embedded): {report.rows_blank}."
        )

    def _check_finished(self, report, options):
        if report.rows_in_quarantine:
            raise CommandError(
                f"{report.rows_in_quarantine} segment(s) have no vector because they are quarantined: list them "
                "with `manage.py embedding_quarantine`, fix the cause, then run "
                "`manage.py backfill_embeddings --retry-quarantined`.",
                returncode=QUARANTINE_LEFT,
            )
        left = report.rows_remaining
        if left and not options["json"]:
            why = ("--limit was reached. Run" if options["limit"] is not None else
                   "they arrived or changed while it ran. A follower (`backfill_embeddings --follow`) embeds them "
                   "as they come; without one, run")
            self.stdout.write(self.style.WARNING(
                f"{left} segment(s) still need a vector: {why} `manage.py backfill_embeddings` again."
            ))


def _device_list(raw):
    """argparse type of --devices: '0,1' -> (0, 1)."""
    try:
        return parse_devices(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("give CUDA device indices, e.g. 0,1") from None


def _limits(options):
    """The run's throttle settings (segments/switch/throttle.py) from its options."""
    return {"max_rows_per_second": options.get("max_rows_per_second"),
            "max_replica_lag": options.get("max_replica_lag", throttle.SETTING)}


def _device_of(encoder):
    """The device the encoder's model runs on ("cuda:1", "cpu"), or None if it does not say."""
    device = getattr(encoder, "device", None)
    return None if device is None else str(device)


def _worker_figures(index, result, device):
    """One worker's line of the report: its device (as it reported it) and its rate."""
    return {"worker": index, "device": result.get("device") or device,
            "rows_embedded": result.get("rows_embedded", 0), "seconds": result.get("seconds", 0.0),
            "rows_per_second": result.get("rows_per_second", 0.0)}


@contextmanager
def stopping_on_signals(stop, say):
    """SIGTERM and SIGINT set `stop` during the block (a service manager's stop, Ctrl-C)."""
    def handle(number, frame):
        say(f"{signal.Signals(number).name}: stopping.")
        stop.set()

    previous = {number: signal.signal(number, handle) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
