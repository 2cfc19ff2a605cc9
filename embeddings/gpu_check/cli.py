"""The command line of `python -m embeddings.gpu_check`: options, the plan, the output."""
import argparse
import importlib
import json
from pathlib import Path

from embeddings.devices import parse_devices
from embeddings.gpu_check.run import CPU_TEXTS_PER_CALL, CUDA_TEXTS_PER_CALL, QUICK_TEXTS_PER_CALL, Plan

# Defaults by kind of run: texts per measurement, seconds per measurement, warm-up texts, deadline, the
# sweep's texts per model call, texts per backfill claim.
DEFAULTS = {
    "cuda": {"texts": 16384, "seconds": 3.0, "warmup": 2048, "deadline": 300.0, "texts_per_call": CUDA_TEXTS_PER_CALL,
             "rows_per_claim": 1000},
    "cpu": {"texts": 128, "seconds": 3.0, "warmup": 16, "deadline": 300.0, "texts_per_call": CPU_TEXTS_PER_CALL,
            "rows_per_claim": 1000},
    "quick": {"texts": 32, "seconds": 0.0, "warmup": 4, "deadline": 120.0, "texts_per_call": QUICK_TEXTS_PER_CALL,
              "rows_per_claim": 8},
}
DESCRIPTION = ("GPU throughput of the encode pipeline with a bge-small-en-v1.5-shaped model: "
               "SentenceTransformer.encode against the pipeline, fp32 and fp16, a sweep of texts per model call, "
               "the limiting stage, each GPU and all together. See docs/gpu-check.md.")
NEEDS = ("python -m embeddings.gpu_check needs torch, transformers and sentence-transformers "
         "(pip install torch transformers sentence-transformers numpy)")


def positive_ints(raw):
    values = tuple(int(part) for part in raw.split(",") if part.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r}: give positive integers separated by commas, e.g. 64,256")
    return values


def devices_option(raw):
    """'cpu', or CUDA device indices '0,2'."""
    if raw.strip() == "cpu":
        return "cpu"
    try:
        return parse_devices(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r}: give distinct CUDA device indices such as 0,2, or cpu") from None


def parser():
    p = argparse.ArgumentParser(prog="python -m embeddings.gpu_check", description=DESCRIPTION)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on stdout")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file, e.g. "
                   "docs/gpu-check-h200-2026-12-04.json")
    p.add_argument("--quick", action="store_true",
                   help="a few texts on the CPU, in seconds: the same figures, for tests")
    p.add_argument("--seconds", type=float,
                   help="each measurement's budget after its warm-up (default 3; 0 in --quick)")
    p.add_argument("--texts-per-call", type=positive_ints, help="texts per model call of the sweep (default "
                   "64-1024 on CUDA, 16,32,64 on the CPU, 8,16 with --quick)")
    p.add_argument("--devices", type=devices_option, help="CUDA device indices to measure, alone then together "
                   "(default: every visible one; the sweep runs on the first); 'cpu' runs the worker path on "
                   "the CPU")
    p.add_argument("--texts", type=int,
                   help="texts each measurement encodes, in one pipeline.encode call (default 16384 on "
                   "CUDA, 128 on the CPU, 32 with --quick)")
    p.add_argument("--deadline", type=float, help="seconds after which the remaining measurements are skipped "
                   "(default 300)")
    p.add_argument("--rows-per-claim", type=int, help="texts per backfill claim for the claims in calls and "
                   "streamed (backfill_embeddings --batch-size; default 1000, 8 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the texts")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def cuda_count():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def chosen_devices(option, visible):
    """The devices section's devices, and why it is skipped when it is."""
    if option == "cpu":
        return ("cpu",), ""
    if option:
        missing = [index for index in option if index >= visible]
        if missing:
            raise SystemExit(f"CUDA device(s) {', '.join(map(str, missing))} not visible (torch sees {visible}): "
                             "choose among the visible ones with --devices, or leave it out to use them all")
        return tuple(f"cuda:{index}" for index in option), ""
    if visible:
        return tuple(f"cuda:{index}" for index in range(visible)), ""
    return (), ("no CUDA device visible (torch.cuda.is_available() is False): each GPU alone and all of them "
                "together are measured on CUDA machines ('--devices cpu' runs the worker path on the CPU)")


def quick_devices(option):
    """--quick's devices section: the worker path on the CPU with '--devices cpu', else skipped."""
    if option not in (None, "cpu"):
        raise SystemExit("--quick measures the CPU: leave --devices out, or pass --devices cpu")
    return (("cpu",), "") if option else ((), "--quick measures the CPU only ('--devices cpu' adds the worker path)")


def _plan(kind, device, devices, args):
    defaults = DEFAULTS[kind]
    return Plan(
        device=device, texts=args.texts or defaults["texts"],
        texts_per_call=args.texts_per_call or defaults["texts_per_call"],
        dtypes=("fp32", "fp16") if kind == "cuda" else ("fp32",),
        seconds=defaults["seconds"] if args.seconds is None else args.seconds, warmup_texts=defaults["warmup"],
        deadline_s=args.deadline or defaults["deadline"], devices=devices[0], devices_skipped=devices[1],
        quick=args.quick, seed=args.seed, rows_per_claim=args.rows_per_claim or defaults["rows_per_claim"],
    )


def plan_from(args):
    """The run's plan: the sweep on the first chosen CUDA device, else on the CPU."""
    if args.quick:
        return _plan("quick", "cpu", quick_devices(args.devices), args)
    devices = chosen_devices(args.devices, cuda_count())
    cuda = [device for device in devices[0] if device.startswith("cuda")]
    return _plan("cuda", cuda[0], devices, args) if cuda else _plan("cpu", "cpu", devices, args)


def check_libraries():
    for name in ("torch", "transformers", "sentence_transformers"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(f"{NEEDS}: {exc}") from None


def main(argv=None):
    args = parser().parse_args(argv)
    for name in ("texts", "rows_per_claim"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    check_libraries()
    from embeddings.gpu_check.check import run_check
    from embeddings.gpu_check.report import render

    result = run_check(plan_from(args), quiet=args.quiet)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
