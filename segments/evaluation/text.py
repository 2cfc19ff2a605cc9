"""The evaluation's report as lines of text, for `manage.py embedding_eval`."""

SETS = (("known_item", "known-item"), ("labelled", "labelled"), ("logged_judged", "logged, labelled"))


def _value(figure):
    return "   –  " if figure is None or figure.get("value") is None else f"{figure['value']:.3f}"


def _interval(figure):
    return "" if figure is None or figure.get("value") is None else f" ({figure['low']:.2f}-{figure['high']:.2f})"


def _ms(value):
    return "–" if value is None else f"{value:.1f}"


def report_lines(report):
    yield from _header(report)
    yield from _query_sets(report)
    yield from _neighbours(report)
    yield from _health(report)
    yield from _latency(report)
    yield from _verdict(report)


def _header(report):
    old, new, rows = report["old"], report["new"], report["rows"]
    yield f"old: segments.{old['column']} {old['type']}({old['dimensions']}), {old['model']}"
    yield f"new: segments.{new['column']} {new['type']}({new['dimensions']}), {new['model']}"
    share = f" ({rows['share']:.1%})" if rows["share"] is not None else ""
    yield (f"judged on the {rows['judged']:,} of {rows['with_text']:,} segments with text that have both vectors"
           f"{share}; phase {report['phase']}")
    yield f"mode: {report['mode']} ({report['mode_why']})"
    yield ""


def _query_sets(report):
    found = report["queries"]
    for key, name in SETS:
        figures = found.get(key)
        if not figures or "new" not in figures:
            continue
        yield f"{name} queries: {figures['n']} of {figures['asked']}"
        yield f"  {'':<11}{'old':<22}{'new':<22}"
        for metric, label in (("recall_at_1", "recall@1"), ("recall_at_10", "recall@10"), ("mrr_at_10", "MRR@10")):
            old, new = figures.get("old", {}).get(metric), figures["new"][metric]
            yield f"  {label:<11}{_value(old) + _interval(old):<22}{_value(new) + _interval(new):<22}"
        if "change" in figures:
            yield from _change("recall@10 change", figures["change"])
            yield from _slices(figures["slices"])
        if "agreement" in figures:
            yield from _agreement(figures["agreement"])
        yield ""
    logged = found.get("logged")
    if logged:
        yield f"logged questions ({found['logged_table']}): {logged['n']} replayed through both searches"
        yield from _agreement(logged.get("agreement") or {"n": 0})
        yield ""


def _change(label, change):
    if change["n"]:
        yield (f"  {label}: {change['change']:+.3f} (95% interval {change['low']:+.3f}..{change['high']:+.3f}; "
               f"{change['lost']} lost, {change['gained']} gained)")


def _slices(slices):
    if slices:
        yield (f"  {'by slice':<34}{'n':>5}  {'recall@10 old -> new':>21}  {'MRR@10 old -> new':>18}  "
               "recall@10 change")
    for entry in slices:
        change, label = entry["change"], f"{entry['slice']}: {entry['value']}"
        mrr = f"{entry['old']['mrr_at_10']['value']:.3f} -> {entry['new']['mrr_at_10']['value']:.3f}"
        yield (f"  {label[:34]:<34}{entry['n']:>5}  {change['old']:>11.3f} -> {change['new']:.3f}  {mrr:>18}  "
               f"{change['change']:+.3f} ({change['low']:+.2f}..{change['high']:+.2f})")


def _agreement(agreement):
    if agreement.get("n"):
        yield (f"  top 10 in common: {agreement['overlap_at_10']:.0%} on average, RBO {agreement['rbo']:.3f} "
               f"({agreement['n']} queries)")


def _neighbours(report):
    found = report["neighbours"]
    judged = "judged" if report["mode"] == "stored" else "reported"
    yield (f"stored-vector neighbours ({judged}): {found['change']['n']} segments with a same-moment partner, "
           f"among {found['pool']:,} segments of whole videos")
    old, new = found["old"]["recall_at_10"], found["new"]["recall_at_10"]
    yield f"  same moment in the top 10: old {_value(old)}{_interval(old)}, new {_value(new)}{_interval(new)}"
    video = found["same_video_at_10"]
    if video["old"] is not None:
        yield f"  share of the top 10 from the same video: old {video['old']:.3f}, new {video['new']:.3f}"
    yield from _change("change", found["change"])
    if report["mode"] == "stored":
        yield from _slices(found["slices"])
    yield ""


def _health(report):
    for label in ("old", "new"):
        figures = report["health"][label]
        median = figures["median_distance"]
        state = "; ".join(figures["problems"]) or (
            f"sound: median distance between different texts {median:.3f}, no zero vector, "
            f"{figures['duplicated']} shared with another text" if median is not None else "too few vectors to judge")
        yield f"vectors ({label}, {figures['vectors']} sampled): {state}"
    yield ""


def _latency(report):
    yield f"latency (ms; the live search uses ef_search {report['ef_search']})"
    for label in ("old", "new"):
        side = report["latency"][label]
        embed = side["embed"]
        shown = f"p50 {_ms(embed['p50_ms'])}, p95 {_ms(embed['p95_ms'])}" if embed else "not measured (no model)"
        yield f"  {label}: question embedding {shown}; exact search p95 {_ms(side['curve']['exact'].get('p95_ms'))}"
        if not side["curve"]["points"]:
            yield f"       no valid HNSW index on segments.{report[label]['column']}: every search scans the table"
        for point in side["curve"]["points"]:
            recall = "–" if point["recall_at_10"] is None else f"{point['recall_at_10']:.3f}"
            yield (f"       ef_search {point['ef_search']:>4}: p50 {_ms(point['p50_ms'])}, p95 {_ms(point['p95_ms'])}, "
                   f"p99 {_ms(point['p99_ms'])}; index recall@10 {recall}")
    budget = report["budget"]
    if budget["timed_out"] or budget["skipped"]:
        yield (f"  {budget['timed_out']} search(es) hit the statement timeout and {budget['skipped']} were not run "
               f"(the {budget['seconds']:g} s budget was spent)")
    yield ""


def _verdict(report):
    yield f"Verdict: {report['verdict']}"
    for reason in report["reasons"]:
        yield f"  - {reason}"


def candidate_lines(found):
    yield (f"{found['sample']:,} segments of {found['videos']:,} whole videos, {found['queries']} known-item queries; "
           f"vectors kept in memory, never written to the table (sizes for the {found['rows_with_text']:,} segments "
           f"with text, {found['storage']} storage)")
    yield (f"{'rank':<6}{'recall@1':>9}{'recall@10':>11}{'MRR@10':>8}{'moment@10':>11}{'texts/s':>9}{'dims':>6}"
           f"{'bytes/row':>11}{'HNSW graph':>12}")
    for number, entry in enumerate(found["candidates"], 1):
        if entry.get("problem"):
            yield f"{'–':<6}{entry['model']}: {entry['problem']}"
            continue
        known = entry["known_item"]
        yield (f"{number:<6}{_value(known['recall_at_1']):>9}{_value(known['recall_at_10']):>11}"
               f"{_value(known['mrr_at_10']):>8}{_value(entry['neighbours']['recall_at_10']):>11}"
               f"{entry['texts_per_second']:>9.1f}{entry['dimensions']:>6}{entry['bytes_per_row']:>11,}"
               f"{entry['index_bytes'] / 2**20:>9.1f} MB")
        named = "" if entry["model"] in entry["description"] else f" ({entry['model']})"
        yield f"      {entry['description']}{named}"
        for problem in entry["health"]["problems"]:
            yield f"      ! {problem}"
