"""The GPU check's figures as readable text: a few aligned tables."""


def _number(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(headers, rows):
    """Lines of a table whose columns are as wide as their widest cell: the first column and a
    last column headed "" (notes) left-aligned, the others (numbers) right-aligned."""
    cells = [list(headers)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    left = {0, len(headers) - 1} if headers[-1] == "" else {0}
    return ["  ".join(cell.ljust(width) if column in left else cell.rjust(width)
                      for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in cells]


def _header(result):
    machine, texts = result["machine"], result["texts"]
    gpus = ", ".join(f"{gpu['name']} ({gpu['memory_gib']} GiB)" for gpu in machine["gpus"]) or "none"
    return [
        f"GPU throughput check, {machine['date']} on {result['device']}{' (--quick)' if result['quick'] else ''}",
        f"model: {result['model']['shape']}, {result['note']}",
        f"machine: GPUs {gpus}; CUDA {machine['cuda'] or '-'}; {machine['cpu']} ({machine['cpu_count']} CPUs); "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"sentence-transformers {machine['sentence_transformers']}",
        f"texts: {texts['count']} demo segments a call, {texts['mean_tokens']} tokens on average "
        f"(p95 {texts['p95_tokens']}, longest {texts['max_tokens']})",
    ]


def _sweep(result):
    rows = [(row["dtype"], row["texts_per_call"], _number(row["st_encode"]["texts_per_s"], 1),
             _number(row["pipeline"]["texts_per_s"], 1), _number(row["pipeline"]["tokens_per_s"]),
             f"{row['ratio']:.2f}x", _number(row["pipeline"]["peak_memory_mb"]))
            for row in result["sweep"]]
    base = result["baseline"]
    lines = ["", "SentenceTransformer.encode against the pipeline (texts/s, tokens/s)"]
    lines += table(("dtype", "texts/call", "encode texts/s", "pipeline texts/s", "tokens/s", "ratio", "peak MiB"), rows)
    lines.append(f"baseline, plain encode(texts) ({base['texts_per_call']} texts per call, fp32): "
                 f"{_number(base['texts_per_s'], 1)} texts/s, {_number(base['tokens_per_s'])} tokens/s")
    return lines


def _best(result):
    best, target = result["best"], result["target"]
    if not best:
        return []
    pipe = best["pipeline"]
    met = {True: "met", False: "NOT met", None: "not applicable here"}[target["met"]]
    return [f"best: the pipeline, {best['dtype']}, {best['texts_per_call']} texts per call: "
            f"{_number(pipe['texts_per_s'], 1)} texts/s, {_number(pipe['tokens_per_s'])} tokens/s "
            f"({best['ratio_to_st_encode']:.2f}x the best encode, "
            f"{best['ratio_to_baseline']:.2f}x the baseline)",
            f"target: {target['texts_per_s']:,} texts/s on one H100-class GPU: {met}"]


def _stage_row(name, figures):
    if "skipped" in figures:
        return (name, "-", "-", figures["skipped"])
    return (name, _number(figures["texts_per_s"], 1), _number(figures["tokens_per_s"]), "")


def _stages(result):
    section = result.get("limiting_stage")
    if not section:
        return []
    rows = [_stage_row(name, figures) for name, figures in section["stages"].items()]
    rows.append(("pipeline, end to end", _number(section["pipeline_texts_per_s"], 1), "", ""))
    return (["", f"stages alone ({section['dtype']}, {section['texts_per_call']} texts per call, "
                  f"{section['batches']} batches)"]
            + table(("stage", "texts/s", "tokens/s", ""), rows)
            + [f"limiting stage: {section['limiting']}; {section['reading']}"])


def _scaling(result):
    scaling, details = result.get("tokenization_scaling"), result.get("tokenization")
    if not scaling:
        return []
    rows = [(threads, _number(rate, 1), f"{details['speedup'][threads]:.2f}x") for threads, rate in scaling.items()]
    rows.append(("model.preprocess", _number(details["model_preprocess_one_thread"], 1), "one thread, the former path"))
    return (["", f"tokenization alone by threads ({details['path']}, {details['texts']} texts, "
                  f"{details['texts_per_call']} per call, best of {details['rounds']} rounds; the pipeline uses "
                  f"{details['pipeline_threads']} here; load average {details['load_average'][0]})"]
            + table(("threads", "texts/s", ""), rows))


def _worker_row(entry):
    if "error" in entry:
        return (entry["device"], "-", "-", entry["error"])
    return (entry["device"], _number(entry["texts_per_s"], 1), _number(entry["tokens_per_s"]), entry["name"])


def _devices(result):
    section = result.get("devices") or {}
    if "skipped" in section or not section:
        return ["", f"devices: skipped: {section.get('skipped', 'not measured')}"]
    rows = [_worker_row(entry) for entry in section["each"]]
    both = section.get("together", {})
    if "skipped" in both:
        rows.append(("all together", "-", "-", both["skipped"]))
    elif both:
        rows.append(("all together", _number(both["texts_per_s"], 1), _number(both["tokens_per_s"]),
                     f"failed: {', '.join(both['failed'])}" if both["failed"] else "summed"))
    return (["", f"devices, one worker process each ({section['dtype']}, {section['texts_per_call']} texts per call)"]
            + table(("device", "texts/s", "tokens/s", ""), rows))


def _extras(result):
    lines = [""]
    calls = result.get("backfill_calls")
    if calls:
        lines.append(f"in calls of {calls['rows_per_claim']} texts (a backfill claim): "
                     f"{_number(calls['texts_per_s'], 1)} texts/s, {calls['against_one_call']:.2f}x one call")
        streamed = calls.get("streamed")
        if streamed:
            lines.append(f"the same claims streamed into one pipeline: {_number(streamed['texts_per_s'], 1)} texts/s, "
                         f"{streamed['against_one_call']:.2f}x one call")
    cosines = result["agreement"]["min_cosine_to_st_encode_fp32"]
    lines.append("pipeline vectors against fp32 encode's, smallest cosine: "
                 + ", ".join(f"{dtype} {value:.5f}" for dtype, value in cosines.items()))
    lines += [f"skipped: {reason}" for reason in result["skipped"]]
    lines.append(f"{result['seconds']} s in all; save the figures with --json --out {result['suggested_out']}")
    return lines


def render(result):
    """The result dict of a run as text."""
    return "\n".join(_header(result) + _sweep(result) + _best(result) + _stages(result) + _scaling(result)
                     + _devices(result) + _extras(result))
