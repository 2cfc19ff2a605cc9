"""`manage.py embedding_status`: where the switch stands, and the next command to run.

Reads only (segments.switch.status.collect); safe to run at any moment, as often as wanted.
"""
import json

from django.core.management.base import BaseCommand
from django.db import DEFAULT_DB_ALIAS

from segments.switch.status import collect, human_bytes, human_duration

BAR_WIDTH = 30
MARKS = {"done": "✓", "current": "▶", "todo": "·"}
SECTIONS = ("_phase", "_rows", "_backfill", "_indexes", "_evaluation", "_swap", "_size", "_findings", "_next")


def number(value):
    return "–" if value is None else f"{value:,}"


def bar(percent):
    filled = round(BAR_WIDTH * (percent or 0) / 100)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


class Command(BaseCommand):
    help = "Shows where the embedding switch stands (phase, rows, workers, index, swap, sizes) and the next command."

    def add_arguments(self, parser):
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS, help='Database alias. Default "default".')
        parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")

    def handle(self, *args, **options):
        status = collect(using=options["database"])
        if options["json"]:
            self.stdout.write(json.dumps(status))
            return
        sections = SECTIONS if status["phase"] is not None else ("_phase", "_next")
        for section in sections:
            for line in getattr(self, section)(status):
                self.stdout.write(line)

    def _phase(self, status):
        yield self.style.MIGRATE_HEADING(f"Embedding switch: phase {status['phase'] or '(no segments table)'}")
        if status["phase"] is None:
            yield f"  {status['problem']}"
            return
        columns = status["columns"]
        for label, column in (("new column", columns["vector"]), ("legacy column", columns["legacy"])):
            if column:
                model = status["models"].get(column["name"])
                recorded = f"  {model['summary']} ({model['source']})" if model else "  (no model recorded yet)"
                yield f"  {label:<14}{column['name']} {column.get('type', 'vector')}({column['dimensions']}){recorded}"
        for column, age in status["pending_age"].items():
            waited = "none waiting" if age is None else f"oldest waiting {human_duration(age)}"
            yield f"  {'waiting':<14}{column}: {waited}"
        yield "  steps         " + "  ".join(f"{MARKS[s['state']]} {s['step']}" for s in status["steps"])

    def _rows(self, status):
        rows = status["rows"]
        yield self.style.MIGRATE_HEADING("Segments")
        if rows["embedded"] is not None and rows["with_text"]:
            percent = 100.0 * rows["embedded"] / rows["with_text"]
            yield (f"  embedded  {bar(percent)} {percent:5.1f}%  "
                   f"{number(rows['embedded'])} of {number(rows['with_text'])} with text")
        yield "  " + " · ".join(f"{label} {number(rows[key])}" for key, label in (
            ("total", "total"), ("with_text", "with text"), ("embedded", "embedded"), ("pending", "pending"),
            ("quarantined", "quarantined"), ("blank", "blank")))

    def _backfill(self, status):
        backfill = status["backfill"]
        if status.get("pause"):
            yield self.style.WARNING(f"Paused: the switch's bulk writes are {status['pause']['sentence']}; "
                                     "`python manage.py embedding_switch resume` lets them go on.")
        if not backfill["workers"]:
            yield "Backfill: not running; no follower."
            return
        rate = "unknown" if backfill["rows_per_s"] is None else f"{backfill['rows_per_s']:,.1f}"
        followers = sum((worker["mode"] or "").startswith("follow") for worker in backfill["workers"])
        yield self.style.MIGRATE_HEADING(
            f"Backfill: {len(backfill['workers'])} worker(s) ({followers} following), {rate} rows/s, "
            f"ETA {human_duration(backfill['eta_seconds'])}")
        for worker in backfill["workers"]:
            ids, rate = worker["claimed_ids"], worker.get("recent_rows_per_s") or worker["rows_per_s"]
            last = worker.get("seconds_since_last_batch")
            yield (f"  {worker['name']:<24} {worker.get('mode') or 'backfill':<22} {worker['device'] or 'device ?':<8} "
                   f"{number(worker['rows_done'])} rows  {'–' if rate is None else f'{rate:,.1f}'} rows/s  "
                   f"last batch {'none yet' if last is None else human_duration(last) + ' ago'}"
                   + (f"  -> {worker['column']}" if worker.get("column") else "")
                   + (f"  ids {ids[0]}..{ids[1]}" if ids else "")
                   + _link(worker))
            if worker.get("waiting_for"):
                yield self.style.WARNING(f"    waiting: {worker['waiting_for']}")

    def _indexes(self, status):
        build = status["index_build"]
        if build is not None:
            done = [f"{build['percent_blocks']}% of blocks" if build["percent_blocks"] is not None else None,
                    f"{number(build['tuples_done'])} of {number(build['tuples_total'])} tuples"
                    if build["tuples_total"] else None]
            yield self.style.WARNING(f"Index build in progress ({build['index'] or 'new index'}): {build['phase']}"
                                     + "".join(f", {part}" for part in done if part))
        for label, index in (("HNSW index", status["indexes"]["hnsw"]), ("legacy index", status["indexes"]["legacy"])):
            if index is None:
                yield f"{label}: none."
                continue
            state = self.style.SUCCESS("valid") if index["valid"] else self.style.ERROR("INVALID")
            kind = f" ({index['method']} {index['opclass']})" if "method" in index else ""
            yield f"{label}: {index['name']}{kind} {state}"
        yield from self._index_plan(status["index_plan"])

    def _index_plan(self, plan):
        """What an HNSW build on the new column runs with (segments.index_build), and why."""
        if plan is None:
            return
        graph = plan["estimate"]
        yield (f"HNSW build: graph of {graph['rows']:,} × {graph['value_type']} ≈ {human_bytes(graph['bytes'])}; "
               f"maintenance_work_mem {human_bytes(plan['maintenance_work_mem'])}, "
               f"up to {plan['parallel_workers']} parallel worker(s)"
               + (self.style.SUCCESS(" (fits)") if plan["fits"] else self.style.ERROR(" (does NOT fit)")))
        yield f"  memory: {plan['maintenance_work_mem_why']}"
        yield f"  workers: {plan['parallel_workers_why']}"

    def _evaluation(self, status):
        """The last go/no-go verdict for the two columns' models (segments.evaluation.record)."""
        found = status.get("evaluation")
        if found is None:
            if status["phase"] in ("expanded", "swapped"):
                yield "Evaluation: none yet for these two models (`python manage.py embedding_eval`)."
            return
        style = {"GO": self.style.SUCCESS, "NO-GO": self.style.ERROR}.get(found["verdict"], self.style.WARNING)
        yield (f"Evaluation: {style(found['verdict'])} ({found['mode']} mode, {human_duration(found['age_seconds'])} "
               f"ago, by {found['by']})")
        for judged in found["judged"]:
            yield (f"  {judged['set']}: recall@10 {judged['old']:.3f} -> {judged['new']:.3f} over {judged['n']} "
                   f"(95% interval of the change {judged['low']:+.3f}..{judged['high']:+.3f})")
        for reason in found["reasons"] if found["verdict"] != "GO" else ():
            yield f"  - {reason}"

    def _swap(self, status):
        swap = status["swap"]
        if swap["done"]:
            yield "Swap: done" + (f"; an undo would lack {number(status['undo_lacks'])} legacy vector(s)."
                                  if status.get("undo_lacks") is not None else ".")
        elif swap["accepted"]:
            yield "Swap: " + self.style.SUCCESS("would be accepted now.")
        else:
            yield "Swap: " + self.style.ERROR("would be refused: ") + swap["refusal"]

    def _size(self, status):
        size = status["size"]
        parts = [f"{human_bytes(size['now_bytes'])} now"]
        if size["before_bytes"] is not None:
            parts.append(f"{human_bytes(size['before_bytes'])} before the switch")
        if size["after_contract_bytes"] is not None:
            parts.append(f"{human_bytes(size['after_contract_bytes'])} after the contract")
        yield "Table size: " + "; ".join(parts) + "."

    def _findings(self, status):
        findings = status["preflight"]["findings"]
        yield "Pre-flight: " + ("no findings." if not findings else f"{len(findings)} finding(s).")
        for finding in findings:
            style = self.style.ERROR if finding["level"] == "error" else self.style.WARNING
            level = style("[" + finding["level"] + "]")
            yield f"  {level} {finding['message']}" + (f"\n      fix: {finding['fix']}" if finding["fix"] else "")
        for warning in status["warnings"]:
            yield self.style.WARNING(f"! {warning}")

    def _next(self, status):
        step = status["next"]
        yield self.style.MIGRATE_HEADING("Next: ") + (step["command"] or "nothing to run")
        yield f"  {step['why']}"


def _link(worker):
    """"  round trip 51 ms, 6 batches in flight": how far the worker is from the database."""
    if worker.get("round_trip_ms") is None:
        return ""
    in_flight = worker.get("batches_in_flight")
    return f"  round trip {worker['round_trip_ms']:,.0f} ms" + (f", {in_flight} batches in flight" if in_flight else "")
