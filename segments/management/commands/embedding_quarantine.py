"""`manage.py embedding_quarantine`: list the segments the backfill could not embed, or retry them.

A quarantined segment keeps NULL and is skipped by the backfill until its text changes or it
is released here (`--retry`, or the admin's "retry" action). `backfill_embeddings
--retry-quarantined` retries them too, keeping their attempt counts.
"""
import json

from django.core.management.base import BaseCommand

from segments.models import QuarantinedSegment


class Command(BaseCommand):
    help = "List the segments the backfill quarantined (id, reason, attempts), or release them with --retry."

    def add_arguments(self, parser):
        parser.add_argument("segment_ids", nargs="*", type=int, metavar="segment_id",
                            help="Only these segments (default: all quarantined).")
        parser.add_argument("--retry", action="store_true",
                            help="Release them so the next `backfill_embeddings` embeds them again.")
        parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")
        parser.add_argument("--database", default="default", help='Database alias. Default "default".')

    def handle(self, *args, **options):
        entries = QuarantinedSegment.objects.using(options["database"]).order_by("segment_id")
        if options["segment_ids"]:
            entries = entries.filter(segment_id__in=options["segment_ids"])
        if options["retry"]:
            return self._release(entries, options["json"])
        rows = [
            {"segment_id": entry.segment_id, "attempts": entry.attempts, "reason": entry.reason,
             "first_failed_at": entry.first_failed_at.isoformat(), "last_failed_at": entry.last_failed_at.isoformat()}
            for entry in entries
        ]
        if options["json"]:
            self.stdout.write(json.dumps({"quarantined": rows}))
        elif not rows:
            self.stdout.write("No segment is quarantined.")
        else:
            self._table(rows)

    def _table(self, rows):
        self.stdout.write(self.style.MIGRATE_HEADING(f"{'segment':>10}  {'attempts':>8}  {'last failed':<19}  reason"))
        for row in rows:
            self.stdout.write(f"{row['segment_id']:>10}  {row['attempts']:>8}  {row['last_failed_at'][:19]:<19}  "
                              f"{row['reason']}")
        self.stdout.write(f"{len(rows)} quarantined segment(s). Release them with `manage.py embedding_quarantine "
                          "--retry`, or retry them with `manage.py backfill_embeddings --retry-quarantined`.")

    def _release(self, entries, as_json):
        released = sorted(entries.values_list("segment_id", flat=True))
        entries.filter(segment_id__in=released).delete()
        if as_json:
            self.stdout.write(json.dumps({"released": released}))
            return
        self.stdout.write(self.style.SUCCESS(
            f"Released {len(released)} quarantined segment(s): `manage.py backfill_embeddings` will try them again."
        ))
