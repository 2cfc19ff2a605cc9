"""Each GPU alone, then all of them together: one worker process per device, started with spawn.

A worker builds the same model (same seed) on its device, in the sweep's best dtype, embeds the
same texts through the pipeline at the best number of texts per call, warms up, waits at a barrier for the other
workers, then measures for the run's budget of seconds. Together, the workers' windows overlap,
so their texts/s add up to the machine's. A worker that fails reports its error instead of figures.
"""
import multiprocessing
import queue
from dataclasses import dataclass

from embeddings import pipeline
from embeddings.gpu_check.materials import build_model, segment_texts, set_dtype, token_counts
from embeddings.gpu_check.measure import free_cuda_memory, rate

START_TIMEOUT_S = 300  # a worker's imports, model and warm-up, before it measures


@dataclass(frozen=True)
class WorkerSpec:
    texts: int
    texts_per_call: int
    dtype: str
    seconds: float
    warmup_texts: int
    seed: int = 0


def measure_on(device, spec, barrier):
    """The pipeline's figures on `device`, measured once every worker is ready."""
    import torch

    model = build_model(device, spec.seed)
    set_dtype(model, spec.dtype)
    texts = segment_texts(spec.texts, spec.seed)
    tokens = sum(token_counts(model, texts))
    pipeline.encode(model, texts[: spec.warmup_texts], spec.texts_per_call)
    barrier.wait(timeout=START_TIMEOUT_S)
    figures = rate(lambda: pipeline.encode(model, texts, spec.texts_per_call), len(texts), tokens, device, spec.seconds)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"device": device, "name": name, "dtype": spec.dtype, "texts_per_call": spec.texts_per_call, **figures}


def worker(device, spec, barrier, results):
    """A worker process's body: its figures, or its error, on the `results` queue."""
    try:
        results.put(measure_on(device, spec, barrier))
    except BaseException as exc:  # reported, so that the parent does not wait for it in vain
        barrier.abort()
        results.put({"device": device, "error": f"{type(exc).__name__}: {exc}"})


def _collect(processes, results, devices, timeout_s):
    figures = []
    for _ in processes:
        try:
            figures.append(results.get(timeout=timeout_s))
        except queue.Empty:
            break
    reported = {entry["device"] for entry in figures}
    figures += [{"device": device, "error": f"no answer within {timeout_s:.0f} s"}
                for device in devices if device not in reported]
    return sorted(figures, key=lambda entry: devices.index(entry["device"]))


def run_workers(devices, spec, timeout_s):
    """Figures of one worker per device in `devices`, measured at the same time."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(devices)), context.Queue()
    processes = [context.Process(target=worker, args=(device, spec, barrier, results), daemon=True)
                 for device in devices]
    for process in processes:
        process.start()
    try:
        return _collect(processes, results, list(devices), timeout_s)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def together(figures):
    """The machine's figures: the workers' texts/s and tokens/s added up."""
    measured = [entry for entry in figures if "error" not in entry]
    return {"devices": [entry["device"] for entry in figures], "workers": figures,
            "texts_per_s": round(sum(entry["texts_per_s"] for entry in measured), 1),
            "tokens_per_s": sum(entry["tokens_per_s"] for entry in measured),
            "failed": [entry["device"] for entry in figures if "error" in entry]}


def devices_section(run, row):
    """Each of the plan's devices alone, then all together, at `row`'s configuration (a sweep row)."""
    plan = run.plan
    if not plan.devices:
        return {"skipped": plan.devices_skipped}
    spec = WorkerSpec(len(run.texts), row["texts_per_call"], row["dtype"], plan.seconds, plan.warmup_texts, plan.seed)
    free_cuda_memory(run.device)  # the sweep's cached blocks, for the workers sharing its device
    each = []
    for device in plan.devices:
        if run.out_of_time(f"{device} alone"):
            break
        run.progress(f"{device} alone: a worker process, {row['dtype']}, {row['texts_per_call']} texts per call")
        each.extend(run_workers([device], spec, START_TIMEOUT_S + plan.seconds))
    section = {"dtype": row["dtype"], "texts_per_call": row["texts_per_call"], "each": each}
    if len(plan.devices) < 2:
        section["together"] = {"skipped": "one device: it alone is the whole machine"}
    elif not run.out_of_time("all devices together"):
        run.progress(f"{', '.join(plan.devices)} together: one worker process each")
        section["together"] = together(run_workers(list(plan.devices), spec, START_TIMEOUT_S + plan.seconds))
    return section
