"""The whole switch, end to end, on demo data: what `make demo` runs.

It works only on a database whose name ends in `_demo` (the Makefile uses the embedded
`askdrchaffee_demo`), because it starts by dropping the segments table to rebuild the legacy
state: running it twice gives the same result twice.
"""
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from django.core.management import call_command
from django.core.management.base import CommandError, OutputWrapper
from django.db import connection

from embeddings import ledger
from segments import triggers
from segments.schema import LIVE, TABLE, embedding_schema
from segments.switch import gate

DEMO_SUFFIX = "_demo"
ARRIVAL = "A listener asked whether bone broth counts as a carnivore food, and the answer was yes."
ARRIVAL_WAIT_SECONDS = 60  # the follower embeds one segment in well under a second
QUERIES = [
    "Does red meat raise LDL cholesterol?",
    "how long does it take to adapt to ketosis",
    "can a meat-only diet help with depression",
]


@dataclass
class Storage:
    column_bytes: int
    index_bytes: int

    def __str__(self):
        return f"{self.column_bytes / 2**20:,.1f} MB of vectors + {self.index_bytes / 2**20:,.1f} MB of index"


def require_demo_database():
    name = connection.settings_dict["NAME"]
    if not name.endswith(DEMO_SUFFIX):
        raise CommandError(
            f"The demo rebuilds the segments table, so it runs only on a database whose name ends "
            f"in {DEMO_SUFFIX!r}; this one is {name!r}. Run it with `make demo`, or set "
            "EMBEDDED_DATABASE_NAME=askdrchaffee_demo (or a DATABASE_URL naming such a database)."
        )


def drop_segments():
    """Drop `segments` and every table of the switch built for it (the backfill's bookkeeping, the
    model ledger), and record their migrations as unapplied; the backfill's first tables (the
    embeddings app's 0001, which does not depend on segments) come back empty."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DROP TABLE IF EXISTS segments CASCADE;"
            f"DROP FUNCTION IF EXISTS {triggers.FUNCTION}() CASCADE;"
            f"DROP FUNCTION IF EXISTS {triggers.ARRIVAL}() CASCADE;"
            f"DROP FUNCTION IF EXISTS {triggers.NOTIFY}() CASCADE;"
            "DROP TABLE IF EXISTS segments_switch_event, segments_backfill_worker, segments_pending_since, segments_switch_pause, "
            "embeddings_quarantine, embeddings_backfill_claim, embeddings_vector_column;"
        )
    gate.migrate_to(None, fake=True)
    gate.migrate_to(None, app="embeddings", fake=True)
    gate.migrate_to("0001_initial", app="embeddings")


def reset_to_legacy():
    """Recreate the legacy table (migration 0001), empty, with everything else at head."""
    call_command("migrate", verbosity=0)
    drop_segments()
    gate.migrate_to("0001_initial")


def storage(column, index):
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT coalesce(sum(pg_column_size({column})), 0), "
            "coalesce(pg_relation_size(to_regclass(%s)), 0) FROM segments",
            [index],
        )
        return Storage(*cursor.fetchone())


def count_embedded(column):
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count({column}) FROM segments")
        return cursor.fetchone()[0]


@contextmanager
def collecting(logger):
    """Collect `logger`'s INFO messages (a list, filled while the block runs)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class Demo:
    """Runs the phases in order, writing what it does to `stream`."""

    def __init__(self, stream, style, count):
        self.out, self.style, self.count = OutputWrapper(stream), style, count
        self.stream = stream  # handed to each command as it is: they wrap it themselves

    def step(self, title):
        self.out.write(self.style.MIGRATE_HEADING(f"\n== {title}"))

    def run(self):
        self.step(f"Legacy state: {self.count:,} demo segments with simulated 1536-dim vectors")
        reset_to_legacy()
        call_command("load_demo_segments", count=self.count, stdout=self.stream)
        before = storage("embedding", "segments_embedding_idx")

        self.step("Phase 1: `manage.py migrate` adds embedding_384 (a plain migrate never goes further)")
        call_command("migrate", stdout=self.stream)

        self.step("Before the backfill: `manage.py embedding_switch drop-legacy-index --confirm`")
        call_command("embedding_switch", "drop-legacy-index", confirm=True, stdout=self.stream)

        self.step("Phase 2: `manage.py backfill_embeddings` fills the new column")
        started = time.perf_counter()
        call_command("backfill_embeddings", stdout=self.stream)
        seconds = time.perf_counter() - started
        embedded = count_embedded("embedding_384")

        self.step("Phase 3a: `manage.py embedding_switch index` builds the HNSW index without blocking")
        call_command("embedding_switch", "index", stdout=self.stream)

        self.step("Verify: complete, current, indexed, accurate")
        call_command("verify_embeddings", stdout=self.stream)

        self.step("Go/no-go: `manage.py embedding_eval` judges the new model against the old one")
        try:
            call_command("embedding_eval", stdout=self.stream)
        except SystemExit as verdict:  # NO-GO (1) or INCONCLUSIVE (3): the swap below says what it does with it
            self.out.write(f"  embedding_eval exited {verdict.code}")

        self.step("Phase 3b: `manage.py embedding_switch swap`")
        call_command("embedding_switch", "swap", stdout=self.stream)
        after = storage("embedding", "segments_embedding_hnsw")

        self.step("Search with the new model")
        for query in QUERIES:
            self.out.write(self.style.SQL_FIELD(f'\n"{query}"'))
            call_command("search_segments", query, k=3, stdout=self.stream)

        self.step("Phase 4: `manage.py embedding_switch contract --confirm` gives the legacy space back")
        call_command("embedding_switch", "contract", confirm=True, stdout=self.stream)

        self.step("After the switch: `manage.py backfill_embeddings --follow` keeps new segments searchable")
        arrival = self.follow_an_arrival()

        self.summary(embedded, seconds, before, after, arrival)

    def follow_an_arrival(self):
        """Start a follower, as a service would, insert a segment as the application does, and time
        until the search finds it; the milliseconds."""
        from embeddings.encoder import get_service
        from segments.switch.backfill import Tuning
        from segments.switch.backfill.follow import Follower

        stop = threading.Event()
        follower = Follower(get_service(), batch_size=100, tuning=Tuning(), poll_seconds=2.0, stop=stop,
                            say=lambda line: self.out.write(f"  follower: {line}"))
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)  # it has started and waits for arrivals
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO segments (video_id, start_sec, end_sec, speaker_label, text) VALUES "
                               "('demo-arrival', 0, 9, 'Chaffee', %s) RETURNING id, clock_timestamp()", [ARRIVAL])
                segment_id, committed = cursor.fetchone()
            deadline = time.monotonic() + ARRIVAL_WAIT_SECONDS
            while not self._embedded(segment_id):
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise CommandError(f"The follower did not embed the segment inserted after the switch within "
                                       f"{ARRIVAL_WAIT_SECONDS} s (its lines are above).")
                time.sleep(0.02)
            with connection.cursor() as cursor:
                cursor.execute("SELECT extract(epoch FROM clock_timestamp() - %s) * 1000", [committed])
                waited = float(cursor.fetchone()[0])
            self.out.write(f"  a new segment was searchable {waited:,.0f} ms after its commit:")
            call_command("search_segments", ARRIVAL, k=1, stdout=self.stream)
            return waited
        finally:
            stop.set()
            thread.join(10)

    @staticmethod
    def _embedded(segment_id):
        with connection.cursor() as cursor:
            cursor.execute("SELECT embedding IS NOT NULL FROM segments WHERE id = %s", [segment_id])
            return cursor.fetchone()[0]

    def summary(self, embedded, seconds, before, after, arrival=None):
        from segments.models import SwitchEvent

        schema = embedding_schema()
        sizes = SwitchEvent.objects.filter(step="contract").order_by("-at").first().details
        total_before, total_after = sizes["total_bytes_before_switch"], sizes["total_bytes"]
        swap = SwitchEvent.objects.filter(step="swap").order_by("-at").first().details
        with connection.cursor() as cursor:
            recorded = ledger.entry(cursor, TABLE, LIVE)
        self.step("Summary")
        self.out.write(
            f"segments.embedding holds (the model ledger): {recorded}\n"
            f"rows embedded: {embedded:,} in {seconds:.1f} s ({embedded / seconds:,.1f} rows/s, model load included)\n"
            f"vectors before: {before} (1536 dims)\n"
            f"vectors after:  {after} ({schema.vector_dimensions} dims), "
            f"{1 - after.column_bytes / before.column_bytes:.0%} less for the vectors\n"
            f"the table on disk (heap + TOAST + indexes): {total_before / 2**20:,.1f} MB before the switch, "
            f"{total_after / 2**20:,.1f} MB after the contract ({total_after / total_before:.0%} of before)\n"
            f"the swap blocked writes for {swap['writes_blocked_ms']:.1f} ms and reads for "
            f"{swap['reads_blocked_ms']:.1f} ms\n"
            + (f"a segment inserted after the switch was searchable {arrival:,.0f} ms after its commit (the follower)\n"
               if arrival is not None else "")
            + f"phase now: {schema.phase}"
        )
