"""The GPU check's figures, all measured in one run, as one dict (the `--json` object)."""
import re
import time

from embeddings.gpu_check import claims, compare, materials, scaling, stages, workers
from embeddings.gpu_check.measure import is_cuda
from embeddings.gpu_check.run import Run

TARGET_TEXTS_PER_S = 20_000  # one H100-class GPU, bge-small, the demo segments' lengths
FORMER_CLAIM = "1,500-2,000 texts/s on an RTX 5080 (the former project's figure, never measured)"
NOTE = ("random weights of bge-small-en-v1.5's exact shape: the real model's compute per text, so its speed; "
        "the vectors mean nothing")


def device_slug(result):
    """A short name of the measured device for the figures' file name: "h200", "rtx-5080", "cpu"."""
    if not is_cuda(result["device"]):
        return "cpu"
    index = int(result["device"].split(":")[1])
    name = result["machine"]["gpus"][index]["name"].lower()
    name = re.sub(r"\b(nvidia|geforce|tesla)\b", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def suggested_out(result):
    return f"docs/gpu-check-{device_slug(result)}-{result['machine']['date'][:10]}.json"


def _best(rows, baseline):
    """The pipeline's fastest configuration, against the fastest `encode` and the baseline."""
    top, st_top = compare.best(rows), compare.best(rows, "st_encode")
    return {"dtype": top["dtype"], "texts_per_call": top["texts_per_call"], "pipeline": top["pipeline"],
            "st_encode": {"dtype": st_top["dtype"], "texts_per_call": st_top["texts_per_call"], **st_top["st_encode"]},
            "ratio_to_st_encode": round(top["pipeline"]["texts_per_s"] / st_top["st_encode"]["texts_per_s"], 3),
            "ratio_to_baseline": round(top["pipeline"]["texts_per_s"] / baseline["texts_per_s"], 3)}


def target(run, best):
    if not is_cuda(run.device):
        return {"texts_per_s": TARGET_TEXTS_PER_S, "met": None, "former_claim": FORMER_CLAIM,
                "why": "the target is for one H100-class GPU: this run measured the CPU"}
    measured = best["pipeline"]["texts_per_s"] if best else 0.0
    return {"texts_per_s": TARGET_TEXTS_PER_S, "one_gpu": measured, "met": measured >= TARGET_TEXTS_PER_S,
            "former_claim": FORMER_CLAIM}


def _after_sweep(run, rows, baseline):
    """The figures measured at the sweep's best configuration."""
    if not rows:
        run.skip("the best configuration's figures", "the sweep measured nothing")
        return {"best": None}
    top = compare.best(rows)
    return {"best": _best(rows, baseline), "backfill_calls": claims.backfill_calls(run, top),
            "limiting_stage": None if run.out_of_time("the stages alone") else stages.limiting_stage(run, top),
            "devices": workers.devices_section(run, top)}


def measure(run):
    """Every figure of the run, in order: tokenization scaling (first, before a pool of several threads
    changes the tokenizer's parallelism setting), agreement, baseline, sweep, then at the best configuration."""
    figures = dict(zip(("tokenization_scaling", "tokenization"), scaling.tokenization_scaling(run)))
    figures.update(agreement=compare.agreement(run), baseline=compare.baseline(run))
    figures["sweep"] = compare.sweep(run)
    figures.update(_after_sweep(run, figures["sweep"], figures["baseline"]))
    figures["target"] = target(run, figures["best"])
    return figures


def run_check(plan, quiet=False):
    """Build the model and the texts for `plan`, measure everything; the result dict."""
    started = time.perf_counter()
    header = {"check": "python -m embeddings.gpu_check", "quick": plan.quick, "device": plan.device, "note": NOTE,
              "machine": materials.machine()}
    model = materials.build_model(plan.device, plan.seed)
    texts = materials.segment_texts(plan.texts, plan.seed)
    counts = materials.token_counts(model, texts)
    run = Run(plan, model, texts, sum(counts), quiet)
    header.update(model=materials.model_description(model, plan.seed),
                  texts=materials.texts_description(texts, counts), plan=plan_description(plan))
    result = {**header, **measure(run), "skipped": run.skipped}
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["suggested_out"] = suggested_out(result)
    return result


def plan_description(plan):
    return {"texts": plan.texts, "texts_per_call": list(plan.texts_per_call), "dtypes": list(plan.dtypes),
            "seconds_per_measurement": plan.seconds, "warmup_texts": plan.warmup_texts,
            "deadline_s": plan.deadline_s, "devices": list(plan.devices), "rows_per_claim": plan.rows_per_claim,
            "seed": plan.seed}
