"""The backfill from table to table on this machine's GPU (or CPU), and the GPU check beside it, in one run.

`python -m benchmark.end_to_end --rows 200000` (docs/gpu-end-to-end.sh runs it on a GPU machine,
with the wheels that machine lacks) does, each step timed:

1. a model of BAAI/bge-small-en-v1.5's exact shape with random weights from a fixed seed
   (embeddings/shapes.py: the real model's compute per text, so its speed; meaningless vectors),
   saved as a directory that EMBEDDING_MODEL names;
2. a live-shaped table in an embedded PostgreSQL of its own (a temporary data directory, its own
   database, deleted at the end): the legacy table of migration 0001, `--rows` demo segments with
   simulated 1536-dim legacy vectors (a share loaded alone first, the rest by `--load-processes`
   loaders at once), then `migrate` (phase 1) and `embedding_switch drop-legacy-index --confirm`,
   as the runbook has it;
3. `backfill_embeddings --json` as an operator runs it (extra options with --backfill-args), timed
   from the command's start to its end, beside its own report's rows/s;
4. `embedding_status --json`: every segment with text embedded, none pending, none quarantined;
5. `python -m embeddings.gpu_check --json` on the same machine: the pipeline at its best and the
   model alone (a shorter run than the check's default: GPU_CHECK_ARGS).

It writes one JSON file (`--out-dir`, named after the device and the date): `end_to_end` holds the
headline figures and the targets, beside the backfill's and the status's reports and the GPU check's
result, all unedited. Exit status 1 when a row is left unembedded.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "askdrchaffee_end_to_end"
SEED = 0
LOAD_SHARE = 0.25  # of the rows, loaded first alone (it records the legacy column's model); the rest at once
# The GPU check in this run: the sweep narrowed to where bge-small was fastest on an H200 (256-512 texts
# per call), 2 s a figure. On a CPU, --quick (its figures only show that the path runs).
GPU_CHECK_ARGS = {"cuda": ("--seconds", "2", "--texts-per-call", "256,512,1024", "--deadline", "200"),
                  "cpu": ("--quick",)}
TARGETS = {"backfill_rows_per_s": 20_000, "pipeline_texts_per_s": 30_000, "pipeline_share_of_model_alone": 0.8}
INHERITED_DATABASE = ("DATABASE_URL", "DATABASE_DIRECT_URL", "TEST_DATABASE_NAME")


def say(message):
    print(f"end_to_end: {message}", file=sys.stderr, flush=True)


class Steps:
    """Each step's seconds, in order."""

    def __init__(self):
        self.seconds = {}

    def run(self, name, call, *args):
        say(f"{name} ...")
        started = time.perf_counter()
        result = call(*args)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        say(f"{name}: {self.seconds[name]} s")
        return result


def command(env, *args):
    """Run `python *args` in the project's root with `env`; its stdout (stderr shown on failure)."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def manage(env, *args):
    return command(env, "manage.py", *args)


def last_json(output):
    return json.loads(output.strip().splitlines()[-1])


def save_model(directory, seed):
    """bge-small's shape with random weights from `seed`, saved as a sentence-transformers directory."""
    from embeddings import shapes
    from embeddings.gpu_check import TOKENIZER_DIR

    model = shapes.build_shaped_encoder("bge-small", "cpu", seed, tokenizer=str(TOKENIZER_DIR))
    with shapes.quiet_transformers():
        model.save(str(directory))
    return directory


def load_shares(rows, processes):
    """(rows loaded first, alone; [rows of each loader after it]), adding up to `rows`."""
    if processes == 1:
        return rows, []
    first = max(1, int(rows * LOAD_SHARE))
    shares = [(rows - first) // processes] * processes
    shares[-1] += rows - first - sum(shares)
    return first, [count for count in shares if count > 0]


def load_table(env, rows, processes):
    """The legacy table, `rows` demo segments with simulated legacy vectors, then phase 1, legacy index dropped."""
    manage(env, "migrate", "segments", "0001_initial")
    first, shares = load_shares(rows, processes)
    manage(env, "load_demo_segments", "--count", str(first), "--seed", str(SEED))
    loaders = [subprocess.Popen([sys.executable, "manage.py", "load_demo_segments", "--count", str(count), "--seed",
                                 str(SEED + number)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
               for number, count in enumerate(shares, 1)]
    failed = [loader.communicate()[1] for loader in loaders if loader.wait() != 0]
    if failed:
        raise SystemExit(f"load_demo_segments failed:\n{failed[0][-4000:]}")
    manage(env, "migrate")
    manage(env, "embedding_switch", "drop-legacy-index", "--confirm")


def backfill(env, extra):
    """The command's JSON report, with the seconds from its start to its end."""
    started = time.perf_counter()
    report = last_json(manage(env, "backfill_embeddings", "--json", *extra))
    return report, time.perf_counter() - started


def verified(status):
    rows = status["rows"]
    return rows["pending"] == 0 and rows["quarantined"] == 0 and rows["embedded"] == rows["with_text"]


def gpu_check(env, options):
    return json.loads(command(env, "-m", "embeddings.gpu_check", "--json", "--quiet", *options))


def headline(rows, report, command_seconds, status, check):
    """The `end_to_end` object: the figures, the device and date, the targets."""
    from embeddings.gpu_check.check import device_slug

    cuda = check["device"].startswith("cuda")
    model_alone = (check.get("limiting_stage") or {}).get("stages", {}).get("model", {}).get("texts_per_s")
    pipeline = check["best"]["pipeline"]["texts_per_s"] if check.get("best") else None
    figures = {
        "rows": rows, "rows_embedded": status["rows"]["embedded"], "rows_blank": status["rows"]["blank"],
        "verified": verified(status),
        "backfill_rows_per_s": report["rows_per_second"], "backfill_seconds": report["seconds"],
        "backfill_command_seconds": round(command_seconds, 1),
        "backfill_rows_per_s_with_start_up": round(report["rows_embedded"] / command_seconds, 1),
        "backfill_device": report.get("device"),
        "pipeline_texts_per_s": pipeline, "model_alone_texts_per_s": model_alone,
        "pipeline_share_of_model_alone": round(pipeline / model_alone, 3) if pipeline and model_alone else None,
        "device": check["machine"]["gpus"][0]["name"] if cuda else f"cpu ({check['machine']['cpu']})",
        "device_slug": device_slug(check), "date": check["machine"]["date"],
    }
    met = {name: (figures[name] >= target if cuda and figures[name] is not None else None)
           for name, target in TARGETS.items()}
    return {**figures, "targets": TARGETS, "met": met}


def environment(pgdata, model):
    env = {name: value for name, value in os.environ.items() if name not in INHERITED_DATABASE}
    return {**env, "EMBEDDED_DATABASE_DIR": str(pgdata), "EMBEDDED_DATABASE_NAME": DATABASE,
            "EMBEDDING_MODEL": str(model), "EMBEDDING_DIMENSIONS": "384", "PYTHONUNBUFFERED": "1"}


def run(args, scratch):
    import torch

    with warnings.catch_warnings():  # it warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver

    steps, kind = Steps(), "cuda" if torch.cuda.is_available() else "cpu"
    model = steps.run("model", save_model, scratch / "model", SEED)
    pgdata = scratch / "pgdata"
    pgdata.mkdir()
    with pgserver.get_server(pgdata, cleanup_mode="delete"):  # up until the end, for every command
        env = environment(pgdata, model)
        steps.run("table", load_table, env, args.rows, args.load_processes)
        report, seconds = steps.run("backfill", backfill, env, args.backfill_args.split())
        status = steps.run("status", lambda: last_json(manage(env, "embedding_status", "--json")))
    options = args.gpu_check_args.split() if args.gpu_check_args is not None else GPU_CHECK_ARGS[kind]
    check = steps.run("gpu_check", gpu_check, env, options)
    return {"end_to_end": {**headline(args.rows, report, seconds, status, check), "steps_seconds": steps.seconds},
            "command": "python -m benchmark.end_to_end " + " ".join(args.argv), "backfill": report,
            "status": {"rows": status["rows"], "columns": status["columns"], "phase": status["phase"]},
            "gpu_check": check}


def parser():
    p = argparse.ArgumentParser(prog="python -m benchmark.end_to_end", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000, help="segments in the table (default 200,000)")
    p.add_argument("--load-processes", type=int, default=4, help="loaders at once after the first (default 4)")
    p.add_argument("--gpu-check-args",
                   help="options of the GPU check instead of GPU_CHECK_ARGS, e.g. --gpu-check-args=--quick")
    p.add_argument("--backfill-args", default="",
                   help="extra options of backfill_embeddings, e.g. --backfill-args='--workers 2'")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs",
                   help="where the JSON file goes (default docs/), named gpu-end-to-end-<device>-<date>.json")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if args.rows < 1 or args.load_processes < 1:
        raise SystemExit("--rows and --load-processes must be at least 1")
    scratch = Path(tempfile.mkdtemp(prefix="end-to-end-"))
    os.chmod(scratch, 0o755)  # the embedded server's own user reaches its data directory inside
    try:
        result = run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures = result["end_to_end"]
    out = args.out_dir / f"gpu-end-to-end-{figures['device_slug']}-{figures['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(figures, indent=2))
    say(f"wrote {out}")
    return 0 if figures["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
