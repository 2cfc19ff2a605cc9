import time

from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from segments import demo_data
from segments.schema import SchemaNotReady, embedding_schema


class Command(BaseCommand):
    help = "Fill the segments table with deterministic, realistic demo transcript segments."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=2000, help="Segments to add (default 2000).")
        parser.add_argument("--seed", type=int, default=0, help="Same seed, same segments (default 0).")
        parser.add_argument(
            "--no-legacy-vectors", action="store_true",
            help="Leave the legacy 1536-dim column empty instead of filling it with simulated vectors.",
        )

    def handle(self, *args, count, seed, no_legacy_vectors, **options):
        if count < 1:
            raise CommandError("--count must be at least 1.")
        try:
            schema = embedding_schema()
        except SchemaNotReady as exc:
            raise CommandError(str(exc)) from None
        legacy_column = None if no_legacy_vectors else schema.legacy_column
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            demo_data.load(cursor.cursor, count, seed=seed, legacy_column=legacy_column)
        seconds = time.perf_counter() - started
        vectors = f", simulated legacy vectors in {legacy_column}" if legacy_column else ""
        self.stdout.write(self.style.SUCCESS(
            f"Loaded {count:,} demo segments in {seconds:.1f} s ({count / seconds:,.0f} rows/s{vectors})."
        ))
