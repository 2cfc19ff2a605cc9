"""The operator's steps of the switch, one function each: index, swap, undo, contract.

Each checks that it is safe now (and refuses, changing nothing, with the reason and the fix when
it is not), does its work, records a SwitchEvent and returns what it did. They are what
`manage.py embedding_switch STEP` runs; a plain `manage.py migrate` never runs them
(segments/switch/gate.py). Each is idempotent: run again after it finished, it says so and
changes nothing.
"""
import time
from dataclasses import asdict, dataclass, field

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from segments import index_build
from segments.models import HNSW_M, SwitchEvent
from segments.schema import TABLE, embedding_schema
from segments.switch import gate, swap as swapping
from segments.switch.backfill import count_pending

MIGRATIONS = {
    "index": "0006_embedding_384_hnsw",
    "swap": "0007_swap_embedding",
    "undo": "0006_embedding_384_hnsw",
    "contract": "0008_drop_embedding_legacy",
}
# The index is built over a filled column: a large share of pending rows would make the rest of
# the backfill insert into the graph row by row, many times slower.
INDEX_MAX_PENDING_SHARE = 0.01
SWAP_LOCK_BUDGET_SECONDS = 0.5  # the longest the swap may block writes to embed late arrivals
SWAP_ROUNDS = 5  # backfill passes and lock attempts one `embedding_switch swap` makes


class StepRefused(CommandError):
    """The step cannot run now; nothing was changed."""


@dataclass
class StepResult:
    step: str
    done: bool  # False: it had been done already, nothing changed
    message: str
    details: dict = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


def _migrate(step, using, stdout, **options):
    with gate.allow(step):
        call_command("migrate", "segments", MIGRATIONS[step], database=using, stdout=stdout,
                     verbosity=options.pop("verbosity", 1), **options)


def _phase(using):
    return embedding_schema(using).phase


def _hnsw_valid(using):
    with connections[using].cursor() as cursor:
        from segments.switch import catalog

        return catalog.index_valid(cursor, swapping.HNSW[0])


def _rows_with_text(using):
    from segments.schema import blank_sql

    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM segments s WHERE NOT ({blank_sql()})")
        return cursor.fetchone()[0]


def index(using="default", stdout=None, force=False):
    """Build the HNSW index on the new column, CONCURRENTLY (migration 0006)."""
    phase = _phase(using)
    if phase != "expanded":
        raise StepRefused(f"The index is built in the expanded phase; the table is in phase {phase}. "
                          "`manage.py embedding_status` says what comes next.")
    if _hnsw_valid(using):
        _migrate("index", using, stdout, verbosity=0)  # records the migration if an earlier run stopped
        return StepResult("index", False, "The HNSW index is already built and valid.")
    pending, with_text = count_pending(using), _rows_with_text(using)
    if not force and pending > max(1000, INDEX_MAX_PENDING_SHARE * with_text):
        raise StepRefused(
            f"Index build refused, nothing changed: {pending:,} of {with_text:,} segments with text still "
            "have no vector. Building the graph now makes the backfill insert them one by one, many "
            "times slower than building over a filled column. Run `manage.py backfill_embeddings` "
            "first, or pass --force to build now anyway."
        )
    plan = build_plan(using)  # the build says it again, with the warning, before it starts
    started = time.perf_counter()
    _migrate("index", using, stdout)
    seconds = time.perf_counter() - started
    SwitchEvent.objects.using(using).create(step="index", details={"seconds": round(seconds, 1), "pending": pending})
    return StepResult("index", True, (
        f"HNSW index built in {seconds:.1f} s (maintenance_work_mem {index_build.human(plan.maintenance_work_mem)}, "
        f"up to {plan.parallel_workers} parallel worker(s))."),
        {"seconds": seconds, "build_plan": plan.as_dict()})


def build_plan(using="default"):
    """The memory and workers the HNSW index build on the new column gets (segments.index_build)."""
    column = embedding_schema(using).vector_column
    with connections[using].cursor() as cursor:
        return index_build.plan(cursor, TABLE, column, HNSW_M)


def swap(using="default", stdout=None, encoder=None, backfill=None, rounds=SWAP_ROUNDS,
         lock_budget=SWAP_LOCK_BUDGET_SECONDS):
    """Embed what arrived since the last pass, then swap under a short lock (migration 0007).

    `encoder` is loaded (and warmed) before any lock is taken. Each round runs a backfill pass
    (`backfill(encoder)`, by default the engine's run_backfill), then tries the locked swap
    allowing as many late rows as the encoder embeds within `lock_budget`; a round that finds
    more gives up under the lock, changing nothing, and the next round starts.
    """
    from embeddings.writer import VectorWriter

    phase = _phase(using)
    if phase in ("swapped", "final"):
        return StepResult("swap", False, f"The swap is done already (phase {phase}).")
    reason = swapping.refusal(using)
    if reason:
        raise StepRefused(f"Swap refused, nothing changed: {reason}")
    backfill = backfill or (lambda enc: _catch_up_pass(enc, using))
    encoder.check_dimensions(swapping.NEW, embedding_schema(using).vector_dimensions)
    max_rows = _rows_within(encoder, lock_budget)
    raced = []
    for round_number in range(1, rounds + 1):
        report = backfill(encoder)
        record = swapping.SwapRecord()
        catch_up = swapping.CatchUp(encoder, max_rows, VectorWriter)
        started = time.perf_counter()
        try:
            with swapping.catching_up(catch_up, record):
                _migrate("swap", using, stdout, verbosity=0)
        except swapping.SwapRaced as exc:
            raced.append(exc.pending)
            continue
        commit_ms = (time.perf_counter() - started) * 1000
        details = {**asdict(record), "rounds": round_number, "raced": raced, "lock_budget_rows": max_rows,
                   "rows_embedded_by_last_pass": getattr(report, "rows_embedded", None),
                   "migrate_command_ms": round(commit_ms, 1)}
        return StepResult(
            "swap", True,
            f"Swapped: `embedding` now holds the new vectors. Writes waited {record.writes_blocked_ms:.1f} ms "
            f"(reads {record.reads_blocked_ms:.1f} ms); {record.embedded_under_lock} late segment(s) embedded "
            f"under the lock; round {round_number}.", details)
    raise StepRefused(
        f"Swap gave up after {rounds} rounds, nothing changed: segments kept arriving faster than the lock "
        f"budget ({max_rows} rows in {lock_budget:.1f} s) allows (pending at each try: "
        f"{', '.join(map(str, raced))}). Run `manage.py embedding_switch swap` again at a quieter moment."
    )


def _catch_up_pass(encoder, using):
    """One backfill pass over what is pending now (bounded: it does not chase rows that keep
    arriving; the swap's lock takes care of the last ones)."""
    from segments.switch.backfill import run_backfill

    pending = count_pending(using)
    return run_backfill(encoder, using=using, limit=pending) if pending else None


def _rows_within(encoder, seconds):
    """How many texts `encoder` embeds in `seconds`, measured now (this also warms it up)."""
    texts = [f"Warm-up sentence number {i} about meat, fat and sleep." for i in range(16)]
    encoder.encode_documents(texts[:2])
    started = time.perf_counter()
    encoder.encode_documents(texts)
    per_text = (time.perf_counter() - started) / len(texts)
    return max(1, int(seconds / max(per_text, 1e-6)))


def undo(using="default", stdout=None):
    """Reverse the swap (migration 0007 backwards): the legacy column is searched again."""
    phase = _phase(using)
    if phase == "expanded":
        return StepResult("undo", False, "Nothing to undo: the swap has not happened (phase expanded).")
    if phase != "swapped" or _contract_started(using):
        raise StepRefused("The swap can no longer be undone: the contract has started and the legacy "
                          "vectors are gone.")
    with connections[using].cursor() as cursor:
        lacking = swapping.legacy_vectors_lacking(cursor)
    record = swapping.SwapRecord()
    with swapping.catching_up(None, record):
        _migrate("undo", using, stdout, verbosity=0)
    return StepResult(
        "undo", True,
        f"Undone: `embedding` is the legacy 1536-dim column again (writes waited {record.writes_blocked_ms:.1f} ms). "
        f"{lacking:,} segment(s) with text have no legacy vector (edited or added after the swap): the legacy "
        "search does not find them until the old model embeds them.", {**asdict(record), "legacy_lacking": lacking})


def _contract_started(using):
    last_swap = SwitchEvent.objects.using(using).filter(step="swap").order_by("-at", "-id").first()
    started = SwitchEvent.objects.using(using).filter(step="contract-started")
    if last_swap is not None:
        started = started.filter(at__gte=last_swap.at)
    return started.exists()


def contract(using="default", stdout=None, confirmed=False, batch_size=None, progress_factory=None, out=None):
    """Clear the legacy vectors online, vacuum, then drop the column (migration 0008). Irreversible."""
    from segments.switch import contract as contracting

    phase = _phase(using)
    if phase == "final":
        return StepResult("contract", False, "The contract is done already: the legacy column is gone.")
    if phase != "swapped":
        raise StepRefused(f"The contract follows the swap; the table is in phase {phase}.")
    if not confirmed:
        raise StepRefused("The contract drops the legacy vectors for good (the swap can no longer be undone "
                          "after it). Run it with --confirm once the new search has served long enough.")
    with connections[using].cursor() as cursor:
        contracting.refuse_dependent_views(cursor)
    SwitchEvent.objects.using(using).create(step="contract-started", details={})
    figures = contracting.run(using, batch_size or contracting.DEFAULT_BATCH_SIZE, out=out or (lambda line: None),
                              progress_factory=progress_factory)
    started = time.perf_counter()
    _migrate("contract", using, stdout, verbosity=0)
    figures["drop_column_ms"] = round((time.perf_counter() - started) * 1000, 1)
    with connections[using].cursor() as cursor:
        figures["total_bytes"] = contracting.table_size(cursor)
    before = SwitchEvent.objects.using(using).filter(step="before").order_by("at", "id").first()
    figures["total_bytes_before_switch"] = before.details.get("total_bytes") if before else None
    SwitchEvent.objects.using(using).create(step="contract", details=figures)
    return StepResult("contract", True, "Contracted: the legacy column is gone and its space given back.", figures)
