"""`manage.py embedding_eval`: the old and the new model's search on this table, side by side, ending
in a verdict the swap respects (segments/evaluation/, docs/evaluation.md).

Exit status: 0 GO, 1 NO-GO, 2 could not run (nothing to compare, a bad option), 3 INCONCLUSIVE.
With --candidate MODEL (repeatable): candidate models judged on a sample, ranked, before `makeswitch`.
"""
import json

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS

from segments.evaluation import latency, queries, record, sides, text
from segments.evaluation.run import Options, evaluate
from segments.evaluation.verdict import COULD_NOT_RUN, Rules
from segments.schema import SchemaNotReady

MODES = (sides.AUTO, sides.MODELS, sides.STORED)


def _ef_values(raw):
    values = [int(part) for part in raw.split(",") if part.strip()]
    if not values or any(not 1 <= value <= 1000 for value in values):
        raise ValueError(raw)
    return tuple(values)


def _check_numbers(given):
    """CommandError (exit 2) for a count below 0, or a time or window not above 0."""
    counts = ("queries", "logged", "neighbours", "pool", "latency_queries", "min_queries", "min_slice_queries")
    for name in counts + ("max_search_ms", "max_embed_ms"):
        if given[name] is not None and given[name] < 0:
            raise CommandError(f"--{name.replace('_', '-')} must be 0 or more.", returncode=COULD_NOT_RUN)
    for name in ("window", "seconds", "statement_timeout"):
        if not given[name] > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be above 0.", returncode=COULD_NOT_RUN)


class Command(BaseCommand):
    help = ("Judges the new model against the old one on this table's own segments and questions (recall@1, "
            "recall@10, MRR@10 per slice, stored-vector neighbours, vector health, latency against the index's "
            "recall) and ends in a verdict: exit 0 GO, 1 NO-GO, 2 could not run, 3 INCONCLUSIVE. Only reads.")
    stealth_options = ("encoders",)

    def add_arguments(self, parser):
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS)
        parser.add_argument("--json", action="store_true", dest="as_json", help="Print the whole report as JSON.")
        parser.add_argument("--mode", choices=MODES, default=sides.AUTO,
                            help="models: both searches by questions; stored: each column from its stored vectors "
                                 "(when the old model cannot run here); auto (default): models where both run here.")
        parser.add_argument("--queries", type=int, default=300, help="Known-item queries (default 300).")
        parser.add_argument("--labelled", metavar="FILE",
                            help="Questions with the moments that answer them (CSV or JSON; docs/evaluation.md).")
        parser.add_argument("--logged", type=int, default=200,
                            help="The latest questions of the deployment's log replayed (default 200; 0: none).")
        parser.add_argument("--neighbours", type=int, default=300, help="Segments judged by their stored neighbours.")
        parser.add_argument("--pool", type=int, default=10_000, help="Segments of whole videos they are found among.")
        parser.add_argument("--window", type=float, default=10.0, help="Seconds that still count as the same moment.")
        parser.add_argument("--ef-search", default=",".join(map(str, latency.DEFAULT_EF_SEARCH)),
                            help="The ef_search values of the latency curve (default 20,40,100,200).")
        parser.add_argument("--latency-queries", type=int, default=30, help="Questions timed per point (default 30).")
        parser.add_argument("--tolerance", type=float, default=None,
                            help="NO-GO when recall@10 falls by more than this (default EMBEDDING_EVAL_TOLERANCE).")
        parser.add_argument("--min-queries", type=int, default=30, help="Queries a set needs to be judged (30).")
        parser.add_argument("--min-slice-queries", type=int, default=50, help="Queries a slice needs (default 50).")
        parser.add_argument("--max-search-ms", type=float, default=None, help="NO-GO past this search p95.")
        parser.add_argument("--max-embed-ms", type=float, default=None, help="NO-GO past this question embedding p95.")
        parser.add_argument("--seconds", type=float, default=300.0, help="The searches' time budget (default 300).")
        parser.add_argument("--statement-timeout", type=float, default=30.0, help="Seconds per statement (default 30).")
        parser.add_argument("--seed", type=int, default=0, help="The same seed asks the same queries (default 0).")
        parser.add_argument("--candidate", action="append", metavar="MODEL", default=[],
                            help="Judge this model on a sample instead (repeatable): ranks the candidates.")
        parser.add_argument("--sample", type=int, default=2000, help="--candidate: segments sampled (default 2000).")

    def handle(self, *args, database, as_json, candidate, **options):
        try:
            if candidate:
                return self._candidates(database, as_json, candidate, options)
            report = evaluate(database, self._options(options), options.get("encoders"),
                              None if as_json else self.stderr.write)
        except (sides.EvaluationError, SchemaNotReady, ImproperlyConfigured, queries.LabelledFileError) as exc:
            raise CommandError(str(exc), returncode=COULD_NOT_RUN) from None
        event = record.record(report, database)
        report["event"] = event.pk
        self._show(report, as_json)
        if report["exit_status"]:
            raise SystemExit(report["exit_status"])

    def _options(self, given):
        _check_numbers(given)
        try:
            ef = _ef_values(given["ef_search"])
        except ValueError:
            raise CommandError(f"--ef-search {given['ef_search']!r}: give values from 1 to 1000, separated by commas "
                               "(20,40,100,200).", returncode=COULD_NOT_RUN) from None
        options = Options(mode=given["mode"], queries=given["queries"], neighbours=given["neighbours"],
                          pool=given["pool"], logged=given["logged"], window=given["window"], ef_search=ef,
                          latency_queries=given["latency_queries"], seconds=given["seconds"],
                          statement_timeout=given["statement_timeout"], seed=given["seed"],
                          download=given["mode"] == sides.MODELS)
        options.rules = self._rules(options.rules, given)
        if given["labelled"]:
            options.labelled = queries.read_labelled(given["labelled"])
        return options

    def _rules(self, rules, given):
        tolerance = rules.tolerance if given["tolerance"] is None else given["tolerance"]
        if not 0 <= tolerance < 1:
            raise CommandError(f"--tolerance {tolerance}: give a share of queries between 0 and 1 (0.02).",
                               returncode=COULD_NOT_RUN)
        search, embed = given["max_search_ms"], given["max_embed_ms"]
        return Rules(tolerance=tolerance, min_queries=max(1, given["min_queries"]),
                     min_slice_queries=max(1, given["min_slice_queries"]),
                     max_search_p95_ms=rules.max_search_p95_ms if search is None else search,
                     max_embed_p95_ms=rules.max_embed_p95_ms if embed is None else embed)

    def _show(self, report, as_json):
        if as_json:
            self.stdout.write(json.dumps(report, indent=2, default=str))
            return
        for line in text.report_lines(report):
            self.stdout.write(line)
        style = {0: self.style.SUCCESS, 1: self.style.ERROR}.get(report["exit_status"], self.style.WARNING)
        self.stdout.write(style(f"{report['verdict']} (exit status {report['exit_status']}); recorded as event "
                                f"{report['event']}."))

    def _candidates(self, database, as_json, names, given):
        from segments.evaluation.candidates import compare_candidates

        if given["sample"] < 10:
            raise CommandError("--sample must be at least 10 segments.", returncode=COULD_NOT_RUN)
        found = compare_candidates(names, database, sample=given["sample"], queries_asked=given["queries"],
                                   seed=given["seed"], window=given["window"],
                                   progress=None if as_json else self.stderr.write)
        if as_json:
            self.stdout.write(json.dumps(found, indent=2, default=str))
            return
        for line in text.candidate_lines(found):
            self.stdout.write(line)
