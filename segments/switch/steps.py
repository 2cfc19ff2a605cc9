"""The operator's steps of a switch, one function each: index, swap, undo, contract.

Each checks that it is safe now (and refuses, changing nothing, with the reason and the fix when
it is not), does its work, records a SwitchEvent and returns what it did. They are what
`manage.py embedding_switch STEP` runs; a plain `manage.py migrate` never runs them
(segments/switch/gate.py). Each is idempotent: run again after it finished, it says so and
changes nothing. They act on the switch under way, whichever it is (the first, 0003-0008, or one
`manage.py makeswitch` wrote).
"""
import time
from dataclasses import asdict, dataclass, field

from django.db import connections, transaction

from askdrchaffee import postgres, round_trips
from embeddings import ledger
from segments import index_build
from segments.models import SwitchEvent
from segments.schema import HNSW_M, PREVIOUS, TABLE, blank_sql, embedding_schema
from segments.switch import gate
from segments.switch import swap as swapping
from segments.switch.backfill import count_pending
from segments.switch.backfill.sql import count_pending_sql
from segments.switch.backfill.heartbeat import ALIVE
from segments.switch import throttle as throttling
from segments.switch.backfill.session import worker_name
from segments.switch.throttle import SETTING as THROTTLE_SETTING

# The index is built over a filled column: a large share of pending rows would make the rest of
# the backfill insert into the graph row by row, many times slower.
INDEX_MAX_PENDING_SHARE = 0.01
# Without a follower the swap leaves at most what its model embeds in this many seconds, and embeds them
# right after the commit: they are searchable again about that long after it.
SWAP_LEFT_SECONDS = 2.0
SWAP_ROUNDS = 5  # backfill passes (or waits for the follower) and lock attempts of one swap
FOLLOWER_WAIT_SECONDS = 10.0  # how long a round waits for the follower to catch up
FOLLOWER_ALLOWANCE = 20  # pending rows the swap leaves to a follower, at the least


class StepRefused(swapping.CommandError):
    """The step cannot run now; nothing was changed."""


@dataclass
class StepResult:
    step: str
    done: bool  # False: it had been done already, nothing changed
    message: str
    details: dict = field(default_factory=dict)
    brief: list = field(default=None, compare=False)  # status.brief()'s lines, when the step read them itself

    def as_dict(self):
        found = asdict(self)
        del found["brief"]
        return found


def _columns(using):
    schema = embedding_schema(using)
    return schema, swapping.Columns(schema.vector_column) if schema.phase == "expanded" else None


def _rows_with_text(using):
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM segments s WHERE NOT ({blank_sql()})")
        return cursor.fetchone()[0]


def index(using="default", out=None, force=False):
    """Build the HNSW index on the next model's column, CONCURRENTLY (the switch's index migration)."""
    schema, columns = _columns(using)
    if columns is None:
        raise StepRefused(f"The index is built in the expanded phase; the table is in phase {schema.phase}. "
                          "`manage.py embedding_status` says what comes next.")
    with connections[using].cursor() as cursor:
        valid = postgres.index_valid(cursor, columns.index(columns.next, "hnsw"))
    if valid:
        gate.apply_step("index", using)  # records the migration if an earlier run stopped before
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
    gate.apply_step("index", using, out=out)
    seconds = time.perf_counter() - started
    SwitchEvent.objects.using(using).create(step="index", details={"seconds": round(seconds, 1), "pending": pending})
    return StepResult("index", True, (
        f"HNSW index built in {seconds:.1f} s (maintenance_work_mem {postgres.human_bytes(plan.maintenance_work_mem)}, "
        f"up to {plan.parallel_workers} parallel worker(s))."),
        {"seconds": seconds, "build_plan": plan.as_dict()})


def build_plan(using="default"):
    """The memory and workers the HNSW index build on the new column gets (segments.index_build)."""
    column = embedding_schema(using).vector_column
    with connections[using].cursor() as cursor:
        return index_build.plan(cursor, TABLE, column, HNSW_M)


def followers(using, column):
    """The live followers (`backfill_embeddings --follow`) of the model of `column`: [(name, rows/s)].
    They are found by the model the ledger records for the column (their heartbeat names it), or,
    before its first vector, by the column they write."""
    with connections[using].cursor() as cursor:
        recorded = ledger.entry(cursor, TABLE, column)
        cursor.execute(f"""SELECT w.worker_name, w.recent_rows_per_s FROM segments_backfill_worker w
                           WHERE {ALIVE} AND w.mode LIKE 'follow%%' AND (w.model_name = %s OR w."column" = %s)""",
                       [recorded.identity.name if recorded else None, column])
        return cursor.fetchall()


def swap(using="default", encoder=None, backfill=None, rounds=SWAP_ROUNDS, left_seconds=SWAP_LEFT_SECONDS,
         accept_regression=False):
    """Swap the next model's column into `embedding` under a short lock (the switch's swap migration).

    The locked part is one message to the server (segments/switch/swap.py): nothing is embedded under
    the lock. With a follower running for the next column, the swap only waits for it to catch up, and
    leaves it the few segments that arrive meanwhile: no model is loaded. Without one, `encoder`
    (EMBEDDING_MODEL's service by default) is loaded and warmed before any lock is taken; each round
    runs a backfill pass (`backfill(encoder)`, by default the engine's), then tries the locked swap
    allowing as many late rows as the model embeds within `left_seconds`, which it embeds right after
    the commit. A round that finds more gives up under the lock, changing nothing, and the next
    round starts.
    """
    schema, columns = _columns(using)
    if schema.phase in ("swapped", "final"):
        return StepResult("swap", False, f"The swap is done already (phase {schema.phase}).")
    reason = swapping.refusal(using)
    if reason:
        raise StepRefused(f"Swap refused, nothing changed: {reason}")
    from segments.evaluation.record import require_go

    require_go(using, accept_regression=accept_regression, encoder=encoder)  # a NO-GO is refused, changing nothing
    running = followers(using, columns.next)
    if running:
        return _swap_beside(running, using, columns, rounds)
    from embeddings.encoder import get_service

    model = encoder or get_service()
    model.check_dimensions(columns.next, schema.vector_dimensions)
    _require_the_columns_model(using, columns.next, model)
    max_rows = _rows_within(model, left_seconds)
    backfill = backfill or (lambda enc: _catch_up_pass(enc, using))
    result = _rounds(using, rounds, lambda: backfill(model), max_rows,
                     f"what it embeds right after the commit ({max_rows} rows in {left_seconds:.1f} s)")
    _embed_what_was_left(result, model, using)
    return result


def _require_the_columns_model(using, column, model):
    """ledger.ModelMismatch, before any lock, when `model` (which embeds what the swap leaves) is not the
    model whose vectors the ledger records for `column`."""
    with connections[using].cursor() as cursor:
        recorded = ledger.entry(cursor, TABLE, column)
    if recorded is None:
        return
    identity = ledger.identity_of(model)
    matched, cosine = ledger.same_model(identity, recorded.identity)
    if not matched or recorded.source == "simulated":
        raise ledger.mismatch(TABLE, column, recorded, identity, cosine, "this swap (which embeds what arrives meanwhile)")


def _embed_what_was_left(result, model, using):
    """Right after a swap without a follower: embed the segments it left pending into the live column."""
    left = result.details["left_pending"]
    if not left:
        result.message += " Nothing was left pending."
        return
    from segments.switch.backfill import run_backfill

    started = time.perf_counter()
    report = run_backfill(model, using=using, limit=left)
    seconds = time.perf_counter() - started
    result.details["embedded_after"] = report.rows_embedded
    result.details["embedded_after_ms"] = round(seconds * 1000, 1)
    result.message += (f" The {left} segment(s) that arrived meanwhile were embedded {seconds:.1f} s after the "
                       f"commit ({report.rows_embedded} written).")


def _swap_beside(running, using, columns, rounds):
    """The swap with followers writing the next column: wait for them to catch up, then swap,
    leaving them what arrives meanwhile."""
    rate = sum(rate or 0 for _, rate in running)
    allowance = max(FOLLOWER_ALLOWANCE, int(rate))

    def wait():
        deadline = time.monotonic() + FOLLOWER_WAIT_SECONDS
        with connections[using].cursor() as cursor:  # one session for the whole wait, not one per look
            while time.monotonic() < deadline:
                cursor.execute(count_pending_sql(columns.next))
                if cursor.fetchone()[0] <= allowance:
                    return
                time.sleep(0.1)

    result = _rounds(using, rounds, wait, allowance, f"the follower's allowance ({allowance} rows)")
    names = ", ".join(name for name, _ in running)
    result.message += f" Followers embedding what was left: {names}."
    result.details["followers"] = [name for name, _ in running]
    return result


def _rounds(using, rounds, before, allowance, budget):
    """Up to `rounds` times: `before()` (a pass, or a wait for the follower), then the locked swap
    allowing `allowance` pending segments; the StepResult, or StepRefused after every round raced."""
    raced = []
    for round_number in range(1, rounds + 1):
        report = before()
        attempt = swapping.SwapInputs(allow_pending=allowance)
        started = time.perf_counter()
        try:
            gate.apply_step("swap", using, attempt)
        except swapping.SwapRaced as exc:
            raced.append(exc.pending)
            continue
        record = attempt.record
        details = {**asdict(record), "rounds": round_number, "raced": raced, "allowed_pending": allowance,
                   "rows_embedded_by_last_pass": getattr(report, "rows_embedded", None),
                   "apply_ms": round((time.perf_counter() - started) * 1000, 1)}
        return StepResult(
            "swap", True,
            f"Swapped: `embedding` now holds the new vectors. Writes waited {record.writes_blocked_ms:.1f} ms "
            f"(reads {record.reads_blocked_ms:.1f} ms), by the server's clock, in one message from lock to commit; "
            f"{record.left_pending} segment(s) pending were left to embed, none was embedded under the lock; "
            f"round {round_number}.", details)
    raise StepRefused(
        f"Swap gave up after {rounds} rounds, nothing changed: segments kept arriving faster than {budget} "
        f"allows (pending at each try: {', '.join(map(str, raced))}). Run `manage.py embedding_switch swap` again "
        "at a quieter moment."
    )


def _catch_up_pass(encoder, using):
    """One backfill pass over what is pending now (bounded: it does not chase rows that keep
    arriving; the swap leaves the last ones, and embeds them after its commit)."""
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


def undo(using="default"):
    """Reverse the swap (the swap migration backwards): the replaced model's column is searched again."""
    schema = embedding_schema(using)
    if schema.phase == "expanded":
        return StepResult("undo", False, "Nothing to undo: the swap has not happened (phase expanded).")
    if schema.phase != "swapped" or _contract_started(using):
        raise StepRefused("The swap can no longer be undone: the contract has started and the legacy "
                          "vectors are gone.")
    with connections[using].cursor() as cursor:
        lacking = swapping.legacy_vectors_lacking(cursor)
    inputs = swapping.SwapInputs()
    gate.apply_step("undo", using, inputs)
    record = inputs.record
    return StepResult(
        "undo", True,
        f"Undone: `embedding` holds the replaced model's vectors again ({schema.legacy_dimensions} dims; writes "
        f"waited {record.writes_blocked_ms:.1f} ms). {lacking:,} segment(s) with text have no vector of that model "
        "(edited or added after the swap): its search does not find them until that model embeds them.",
        {**asdict(record), "legacy_lacking": lacking})


def _contract_started(using):
    last_swap = SwitchEvent.objects.using(using).filter(step="swap").order_by("-at", "-id").first()
    started = SwitchEvent.objects.using(using).filter(step="contract-started")
    if last_swap is not None:
        started = started.filter(at__gte=last_swap.at)
    return started.exists()


def contract(using="default", out=None, confirmed=False, rows_per_transaction=None, progress_factory=None,
             max_rows_per_second=None, max_replica_lag=THROTTLE_SETTING):
    """Clear the legacy vectors online, vacuum, then drop the column (the switch's contract migration).
    Irreversible. Its clearing yields to the database's health (segments/switch/throttle.py): a pause,
    a replica more than `max_replica_lag` seconds behind (BACKFILL_MAX_REPLICA_LAG by default; None: no
    limit), `max_rows_per_second` (None: no cap)."""
    from concurrent.futures import ThreadPoolExecutor

    from segments.switch import contract as contracting
    from segments.switch import status

    if not confirmed:
        done = _contract_phase(using)
        if done is not None:
            return done
        raise StepRefused("The contract drops the legacy vectors for good (the swap can no longer be undone "
                          "after it). Run it with --confirm once the new search has served long enough.")
    link = contracting.link_for(using)
    # the throttle looks over the contract's own connection, between its calls: no other to open
    throttle = throttling.Throttle(lambda role: link.open(), using=using, max_rows_per_second=max_rows_per_second,
                                   max_replica_lag=max_replica_lag, say=out, what="the contract")
    try:
        # The contract's own connection opens, and reads what the contract needs (prepare(): the table, the
        # recorded migrations, the throttle's first look), while this one reads the phase: far from the database,
        # side by side rather than one after the other (the block ends when both have).
        with ThreadPoolExecutor(1, thread_name_prefix="contract link") as beside:
            preparing = beside.submit(link.run, lambda cursor: contracting.prepare(
                cursor, look=throttle.look_query_for_reads), shares_message=True)
            done = _contract_phase(using)
        if done is not None:
            return done
        # behind a pooler the link refuses, a view on the legacy column stops the contract, and so does a plain
        # `migrate` with work left: before any change
        prepared = preparing.result()
        plan = gate.contract_plan(prepared.applied, using)
        if prepared.look is not None:
            throttle.observe(prepared.look)
        _start_contract(using)
        figures = contracting.run(link, prepared, rows_per_transaction or contracting.DEFAULT_ROWS_PER_TRANSACTION,
                                  out=out or (lambda line: None), progress_factory=progress_factory,
                                  throttle=throttle)
    finally:
        link.close()
        throttle.close()
    record = contracting.Record(figures)  # written by the drop's message, which reads the brief's lines too
    answers = gate.drop_legacy(plan, using, record, reads=status.brief_reads())
    (out or (lambda line: None))(contracting.after_size_line(record.details))
    return StepResult("contract", True, "Contracted: the legacy column is gone and its space given back.",
                      record.details, brief=status.brief_from(using, answers) if answers is not None else None)


def _contract_phase(using):
    """StepRefused unless the table is at the swap's phase; a StepResult when the contract is done already."""
    schema = embedding_schema(using)
    if schema.phase == "final":
        return StepResult("contract", False, "The contract is done already: the legacy column is gone.")
    if schema.phase != "swapped":
        raise StepRefused(f"The contract follows the swap; the table is in phase {schema.phase}.")
    return None


def _start_contract(using):
    """Retire the legacy column in the model ledger, so that no writer fills it again (a follower of
    the replaced model would refill what the contract clears), and record that the contract began
    (the undo is refused from now on). Under a SHARE lock, briefly, with lock retries, in one message
    (from the lock to the commit, no client round trip): the writers that checked the ledger before
    have committed, and every later one sees the column retired."""
    from segments.operations import giving_up_on_locks, segments_lock_holders

    def attempt(lock_timeout):
        with connections[using].cursor() as cursor:
            retire = cursor.mogrify(*ledger.retire_statement(TABLE, PREVIOUS)).decode()
            cursor.execute(round_trips.message(
                f"SELECT set_config('lock_timeout', {postgres.quote_literal(lock_timeout)}, true)",
                f"LOCK TABLE {TABLE} IN SHARE MODE", retire,
                "INSERT INTO segments_switch_event (step, at, details) VALUES ('contract-started', now(), '{}')"))

    with giving_up_on_locks():
        postgres.with_lock_retries(attempt, what="The contract's start",
                                   holders=lambda: segments_lock_holders(connections[using]))


def _require_pause_table(cursor, step):
    """StepRefused before migration 0011 (no pause table)."""
    cursor.execute(f"SELECT to_regclass('{throttling.PAUSE_TABLE}') IS NOT NULL")
    if not cursor.fetchone()[0]:
        raise StepRefused(f"`embedding_switch {step}` needs migration segments.0011, which this database lacks: "
                          "run `python manage.py migrate` (safe at any phase), then again. Nothing was changed.")


def pause(using="default", reason="", by=None):
    """Pause the switch's bulk writes on every machine (idempotent): each backfill worker and contract
    holds back before its next batch (segments/switch/throttle.py). A StepResult."""
    by = by or worker_name()
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        _require_pause_table(cursor, "pause")
        cursor.execute(f"INSERT INTO {throttling.PAUSE_TABLE} (scope, reason, paused_by, paused_at) VALUES (%s, %s, %s, now()) "
                       "ON CONFLICT (scope) DO NOTHING", [throttling.SCOPE, reason or "", by[:255]])
        inserted = cursor.rowcount == 1
        found = throttling.current_pause(cursor)
        if inserted:
            SwitchEvent.objects.using(using).create(step="pause", details={"by": by, "reason": reason or ""})
    if not inserted:
        return StepResult("pause", False, f"Already {found.sentence()}; nothing changed. "
                                          "`python manage.py embedding_switch resume` resumes the writes.",
                          {"by": found.by, "since": found.at, "reason": found.reason})
    return StepResult("pause", True, (
        f"Paused: every backfill worker and contract, on every machine, holds its writes back from its next batch "
        f"(within {throttling.TAKES_EFFECT_SECONDS} s); a batch in hand is written after the resume, nothing is lost. "
        "Followers go on embedding single arrivals and hold back only catch-up batches. `embedding_status` shows "
        "who waits. "
        "Next: `python manage.py embedding_switch resume`."),
        {"by": found.by, "since": found.at, "reason": found.reason})


def resume(using="default"):
    """End the pause (idempotent); a StepResult."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        _require_pause_table(cursor, "resume")
        found = throttling.current_pause(cursor)
        cursor.execute(f"DELETE FROM {throttling.PAUSE_TABLE} WHERE scope = %s", [throttling.SCOPE])
        if found is not None:
            SwitchEvent.objects.using(using).create(step="resume", details={
                "by": worker_name(), "paused_by": found.by, "paused_since": found.at, "reason": found.reason})
    if found is None:
        return StepResult("resume", False, "Not paused; nothing changed. `python manage.py embedding_status` says "
                                           "what comes next.")
    return StepResult("resume", True, (
        f"Resumed: the writes {found.sentence()} go on within {throttling.TAKES_EFFECT_SECONDS} s, each worker from the batch it "
        "held. `python manage.py embedding_status` shows them."), {"paused_by": found.by, "paused_since": found.at,
                                                                 "reason": found.reason})
