"""What limits the pipeline: its stages timed alone, against its end-to-end rate.

At the pipeline's best configuration, over the same batches (`pipeline.plan_batches`):

- tokenization: the pipeline's own tokenizer pool (`tokenization.Tokenization`, as many threads as
  the pipeline uses on this device: tokenize, and on CUDA pin the tensors), drained in order by a
  consumer that does nothing else; on the CPU;
- host-to-device copy: every batch's tensors copied from pinned memory (`non_blocking`), waited for
  at the end; CUDA only;
- model: the forward pass over every batch, its tensors already on the device.

In the pipeline, tokenization runs on its threads while the device copies and computes, and the copy
and the forward pass share the device's stream: its ceiling is the slower of the tokenizer and
the device (copy and forward one after the other). The slowest stage alone is the limiting one;
an end-to-end rate well below the ceiling says the stages do not overlap as they should.
"""
from embeddings import pipeline, tokenization
from embeddings.gpu_check.materials import set_dtype
from embeddings.gpu_check.measure import is_cuda

STAGE_NAMES = {"tokenize": "tokenization", "copy": "host-to-device copy", "model": "model"}
OVERLAP_SHARE = 0.8  # below this share of its ceiling, the pipeline's stages do not overlap


def tokenized(model, texts, batches, pin, threads=None):
    """[(indices, features)] from a tokenizer pool like the pipeline's (its threads by default), in order."""
    threads = tokenization.default_threads(model.device) if threads is None else threads
    with tokenization.Tokenization(model, threads, pin) as pool:
        return tokenization.tokenize_batches(pool, texts, batches)


def to_device(prepared, device):
    """Every batch's tensors copied to `device` (asynchronously from pinned memory)."""
    return [{key: value.to(device, non_blocking=True) if hasattr(value, "to") else value
             for key, value in features.items()} for _, features in prepared]


def forward(model, on_device):
    """The model over every batch (a copy of each feature dict: the modules add their outputs to it)."""
    import torch

    with torch.inference_mode():
        for features in on_device:
            model(dict(features))


NOT_COPIED = {"skipped": "the model is on the CPU: nothing is copied to a device"}


def _rates(run, batches, pin):
    model, texts, device = run.model, run.texts, run.device
    threads = tokenization.default_threads(device)
    figures = {"tokenize": {**run.rate(lambda: tokenized(model, texts, batches, pin, threads)), "threads": threads},
               "copy": NOT_COPIED}
    prepared = tokenized(model, texts, batches, pin)
    if is_cuda(device):
        to_device(prepared, device)  # warm-up
        figures["copy"] = run.rate(lambda: to_device(prepared, device))
    on_device = to_device(prepared, device)
    forward(model, on_device[:2])  # warm-up
    figures["model"] = run.rate(lambda: forward(model, on_device))
    return figures


def measured(figures):
    return {name: value for name, value in figures.items() if "texts_per_s" in value}


def ceiling(figures):
    """texts/s the pipeline could reach: the slower of the tokenizer and the device (copy + model)."""
    device_seconds = sum(1 / figures[name]["texts_per_s"] for name in ("copy", "model") if name in figures)
    return min(figures["tokenize"]["texts_per_s"], 1 / device_seconds)


def reading(limiting, share, cuda):
    if share > 1 / OVERLAP_SHARE:
        return (f"the pipeline ran at {share:.0%} of the ceiling its stages alone set: the figures are noisy "
                f"(a busy machine, or too short a --seconds); {limiting} is the slowest stage")
    if share < OVERLAP_SHARE:
        shared = "" if cuda else " (on a CPU the tokenizer threads and the model share the cores)"
        return (f"the pipeline reaches {share:.0%} of its ceiling: its stages do not overlap fully{shared}; "
                f"{limiting} is the slowest stage")
    return f"the pipeline runs at {share:.0%} of its ceiling: {limiting} limits it"


def limiting_stage(run, row):
    """The stages alone at `row`'s configuration (a sweep row), the slowest named, against the
    pipeline's end-to-end rate there."""
    run.progress(f"{row['dtype']}, {row['texts_per_call']} texts per call: tokenization, copy and model alone")
    set_dtype(run.model, row["dtype"])
    batches = pipeline.plan_batches(run.texts, row["texts_per_call"], run.model.max_seq_length or 512)
    figures = _rates(run, batches, pin=is_cuda(run.device))
    rates = measured(figures)
    slowest = min(rates, key=lambda name: rates[name]["texts_per_s"])
    end_to_end, top = row["pipeline"]["texts_per_s"], ceiling(rates)
    share = end_to_end / top
    return {"dtype": row["dtype"], "texts_per_call": row["texts_per_call"], "batches": len(batches), "stages": figures,
            "pipeline_texts_per_s": end_to_end, "ceiling_texts_per_s": round(top, 1),
            "share_of_ceiling": round(share, 3), "limiting": STAGE_NAMES[slowest],
            "reading": reading(STAGE_NAMES[slowest], share, is_cuda(run.device))}

