import json

from django.core.management.base import BaseCommand, CommandError

from segments.switch.verify import (MIN_RECALL, RECALL_QUERY_SECONDS, RECALL_SECONDS, GoldenFileError,
                                     read_golden, verify)

LABELS = {True: "OK", False: "FAIL", None: "INFO"}


class Command(BaseCommand):
    help = (
        "Check that the new embeddings are complete, sound and searchable (recall@10 passes when its 95% "
        f"interval lies at or above {MIN_RECALL}, fails when its mean is below, is INFO in between); exit non-zero "
        "if any check fails."
    )

    # Tests hand the command an encoder instead of the configured model.
    stealth_options = ("encoder",)

    def add_arguments(self, parser):
        parser.add_argument("--sample", type=int, default=100,
                            help="Rows to re-encode and to use as recall queries (default 100).")
        parser.add_argument("--golden", metavar="FILE",
                            help="Golden queries: JSON [{\"query\", \"expected\": [ids]}] or CSV query,expected.")
        parser.add_argument("--ef-search", type=int, default=None,
                            help="hnsw.ef_search for the recall check (default HNSW_EF_SEARCH).")
        parser.add_argument("--recall-seconds", type=float, default=RECALL_SECONDS,
                            help=f"Time budget of the recall check: it stops taking queries once spent and says "
                                 f"how many it used (default {RECALL_SECONDS:g}).")
        parser.add_argument("--recall-query-seconds", type=float, default=RECALL_QUERY_SECONDS,
                            help=f"statement_timeout of each recall query (an exact search scans the table); a query "
                                 f"that times out is reported (default {RECALL_QUERY_SECONDS:g}).")
        parser.add_argument("--database", default="default", help="Database alias (default 'default').")
        parser.add_argument("--json", action="store_true", help="Print the report as one JSON object.")

    def handle(self, *args, **options):
        if options["sample"] < 1:
            raise CommandError("--sample must be at least 1.")
        if options["ef_search"] is not None and not 1 <= options["ef_search"] <= 1000:
            raise CommandError("--ef-search must be between 1 and 1000 (pgvector's range).")
        for name in ("recall_seconds", "recall_query_seconds"):
            if not options[name] > 0:
                raise CommandError(f"--{name.replace('_', '-')} must be more than 0.")
        try:
            golden = read_golden(options["golden"]) if options["golden"] else None
        except GoldenFileError as exc:
            raise CommandError(str(exc)) from None
        report = verify(sample=options["sample"], golden=golden, encoder=options.get("encoder"),
                        ef_search=options["ef_search"], recall_seconds=options["recall_seconds"],
                        recall_query_seconds=options["recall_query_seconds"], using=options["database"])
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict()))
        elif options["verbosity"] > 0 or not report.passed:
            self._write(report)
        if not report.passed:
            raise CommandError(f"{len(report.failures)} check(s) failed: {', '.join(report.failures)}.")

    def _write(self, report):
        column = f"segments.{report.column}" if report.column else "segments"
        self.stdout.write(self.style.MIGRATE_HEADING(f"Embeddings in {column} (phase {report.phase})"))
        width = max(len(check.name) for check in report.checks)
        for check in report.checks:
            style = {True: self.style.SUCCESS, False: self.style.ERROR, None: self.style.WARNING}[check.ok]
            self.stdout.write(f"  {style(LABELS[check.ok].ljust(5))} {check.name.ljust(width)}  {check.message}")
        if report.passed:
            self.stdout.write(self.style.SUCCESS("All checks passed."))
