"""Round trips are the unit of cost far from the database: every loop of the switch costs a constant,
small number of them per step, whatever the step holds (askdrchaffee/round_trips.py counts them).

- a backfill batch: two (its message, with the COPY's own), a claim: one, for 10 rows or 200;
- the follower: one claim and one batch's message from an arrival to its vector's commit;
- the contract's clearing: one round trip per call of the server's loop, not per batch;
- the swap and the undo: one message from the table's lock to the commit.
"""
import json
import time

import pytest
from django.db import connection

from askdrchaffee import round_trips
from embeddings.fakes import HashingEncoder
from segments.switch import steps
from segments.switch.backfill import Run, Tuning, Worker, connector, run_backfill, target_for
from segments.switch.backfill import count_pending
from tests.embeddings.conftest import add_segments, sentences, swapped_with_legacy_vectors
from tests.embeddings.test_follow import follower_running, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def counted_pass(batch_size, tuning=None):
    """One backfill pass over what is pending, its sessions' round trips counted from after the worker
    opened them: ({"reader": n, "writers": n, "control": n}, the pass's BackfillReport)."""
    worker = Worker(HashingEncoder(), connector("default"), tuning)
    try:
        target = worker.control.run(lambda connection_, cursor: target_for(cursor, worker))
        worker.start(target.column, batch_size)

        def spent():
            return {"reader": worker.reader.round_trips, "writers": sum(s.round_trips for s in worker.writers),
                    "control": worker.control.round_trips}

        before = spent()
        report = Run(worker, target, batch_size=batch_size).execute()
        after = spent()
        return {key: after[key] - before[key] for key in after}, report
    finally:
        worker.close()


@pytest.mark.parametrize("write_ahead", [False, True], ids=["sent-with-its-batch", "sent-ahead"])
@pytest.mark.parametrize("batch_size", [10, 200])
def test_a_backfill_batch_costs_two_round_trips_and_a_claim_one_whatever_they_hold(segments_at, batch_size,
                                                                                   write_ahead):
    segments_at("expanded")
    add_segments(sentences(400))

    spent, report = counted_pass(batch_size, Tuning(write_ahead=write_ahead))

    assert report.rows_embedded == 400 and count_pending() == 0 and claims_left() == 0
    # the batch's message, and the COPY asking for its data (sent ahead, that trip crosses the wire while
    # the batch is encoded)
    assert spent["writers"] == 2 * report.batches
    # a claim takes one round trip (several batches at a time far from the database); the last ones find
    # the rows in flight, then nothing: at most a few more than the batches
    assert spent["reader"] <= report.batches + 3
    # the pass's counts: the model ledger's entry came with its target, its last claim said what is left
    assert spent["control"] == 1


@pytest.fixture
def writing(segments_at):
    """Three segments at phase 1, and a VectorWriter of the HashingEncoder's model for embedding_384 on a
    connection of its own (autocommit), its ledger entry resolved: (the writer, its connection, ids, texts)."""
    from embeddings.writer import VectorWriter

    segments_at("expanded")
    texts = sentences(3)
    ids = add_segments(texts)
    raw = connector("default")("writer")
    raw.autocommit = True
    try:
        writer = VectorWriter(raw, "embedding_384", 384, identity=HashingEncoder().model_identity())
        with raw.cursor() as cursor:
            writer.resolve(cursor)
        yield writer, raw, ids, texts
    finally:
        raw.close()


def test_a_message_sent_ahead_of_its_batch_waits_in_its_copy_and_writes_the_batch_it_is_handed(writing):
    writer, raw, ids, texts = writing
    with raw.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    seen = {}

    def next_batch():  # asked once the server asked for the data: the message is there before its batch
        deadline = time.monotonic() + 5  # the server sends its call for the data, then waits for it
        while True:
            seen["writer"] = scalar_row("SELECT state, wait_event, query FROM pg_stat_activity WHERE pid = %s", [pid])
            if seen["writer"][1] == "ClientRead" or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        seen["embedded"] = embedded_count()
        return ids, md5s_of(ids), HashingEncoder().encode_documents(texts)

    before = round_trips.round_trips(raw)
    assert writer.write_ahead(next_batch, 10) == 3 and round_trips.round_trips(raw) - before == 2
    state, wait_event, query = seen["writer"]
    assert (state, wait_event) == ("active", "ClientRead") and "COPY" in query
    assert seen["embedded"] == 0 and embedded_count() == 3


def test_a_message_sent_ahead_and_taken_back_writes_nothing_and_its_connection_writes_on(writing):
    writer, _raw, ids, texts = writing

    def no_batch():
        raise LookupError("no batch after all")

    with pytest.raises(LookupError, match="no batch after all"):
        writer.write_ahead(no_batch, 10)
    assert embedded_count() == 0
    too_many = lambda: (ids, md5s_of(ids), HashingEncoder().encode_documents(texts))  # noqa: E731
    with pytest.raises(ValueError, match="at most 2"):
        writer.write_ahead(too_many, 2)
    assert embedded_count() == 0
    assert writer.write_ahead(too_many, 10) == 3 and embedded_count() == 3


def claims_left():
    return scalar_row("SELECT count(*) FROM embeddings_backfill_claim")[0]


def embedded_count():
    return scalar_row("SELECT count(*) FROM segments WHERE embedding_384 IS NOT NULL")[0]


def md5s_of(ids):
    with connection.cursor() as cursor:
        cursor.execute("SELECT md5(text)::uuid FROM segments WHERE id = ANY(%s) ORDER BY array_position(%s, id)",
                       [ids, ids])
        return [row[0] for row in cursor.fetchall()]


def scalar_row(sql, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def test_the_message_of_a_batch_holds_the_copy_and_every_statement_of_its_transaction():
    from embeddings.writer import VectorWriter

    connection.ensure_connection()
    raw = connector("default")("writer")
    raw.autocommit = True
    try:
        ids = add_segments(["one text", "another text"])
        writer = VectorWriter(raw, "embedding", 384, identity=HashingEncoder().model_identity())
        with raw.cursor() as cursor:
            writer.resolve(cursor)  # the first batch's full look at the model ledger
        before = round_trips.round_trips(raw)
        with raw.cursor() as cursor:
            cursor.execute("SELECT id, md5(text)::uuid FROM segments WHERE id = ANY(%s) ORDER BY id", [ids])
            md5s = [md5 for _, md5 in cursor.fetchall()]
        counted = round_trips.round_trips(raw)
        written = writer.write(ids, md5s, HashingEncoder().encode_documents(["one text", "another text"]))
        assert written == 2 and round_trips.round_trips(raw) - counted == 2
        assert counted - before == 1
    finally:
        raw.close()


def test_the_swap_and_the_undo_send_their_lock_checks_renames_and_record_in_one_message(segments_at):
    segments_at("expanded")
    add_segments(sentences(30))
    run_backfill(HashingEncoder())
    steps.index()
    sent = []

    def record(execute, sql, params, many, context):
        sent.append(sql)
        return execute(sql, params, many, context)

    for name, step in (("swap", lambda: steps.swap(encoder=HashingEncoder())), ("undo", steps.undo)):
        sent.clear()
        with connection.execute_wrapper(record):
            step()
        locking = [sql for sql in sent if "IN EXCLUSIVE MODE" in sql]
        assert len(locking) == 1, locking
        message = locking[0]
        for part in ("ACCESS EXCLUSIVE", "RENAME COLUMN", "embeddings_vector_column", "CREATE TRIGGER",
                     "INSERT INTO django_migrations" if name == "swap" else "DELETE FROM django_migrations",
                     "INSERT INTO segments_switch_event"):
            assert part in message, part
        assert connection.get_autocommit()  # one implicit transaction: the server commits at the message's end


def test_the_follower_embeds_an_arrival_in_a_claim_and_a_batchs_message(segments_at):
    import time

    segments_at("expanded")
    with follower_running() as (follower, _lines):
        time.sleep(0.5)  # its first look at the table is over: it waits for an arrival
        worker = follower.worker
        sessions = lambda: (worker.reader.round_trips, sum(s.round_trips for s in worker.writers))  # noqa: E731
        before = sessions()
        add_segments(["a segment that just arrived"])
        assert wait_until(lambda: count_pending() == 0)
        time.sleep(0.5)  # its claim stage has gone back to waiting
        reader, writers = (after - first for after, first in zip(sessions(), before))
    assert writers == 2  # the arrival's batch: one message, and the COPY's own round trip
    assert reader <= 3  # its claim, and the looks that find nothing more (beside the write, not before it)


def test_the_contracts_round_trips_do_not_grow_with_its_batches(segments_at, monkeypatch):
    from segments.switch import contract

    spent = {}
    for rows_per_transaction in (10, 100):
        segments_at("expanded")
        swapped_with_legacy_vectors(300)
        links = []
        original = contract.link_for
        monkeypatch.setattr(contract, "link_for", lambda using: links.append(original(using)) or links[-1])
        result = steps.contract(confirmed=True, rows_per_transaction=rows_per_transaction)
        assert result.details["legacy_vectors_cleared"] == 300
        spent[rows_per_transaction] = links[0].round_trips
        monkeypatch.setattr(contract, "link_for", original)
    # 30 clearing transactions or 3: the same few calls of the server's loop
    assert 0 < spent[10] == spent[100], spent
    # its first message (its routines made, its settings checked, its look at the table and the throttle's), the
    # index drop, three VACUUMs (each alone in its message), the loop's two calls (the moving one looks at the
    # table's sizes first): no wait for older transactions (the calls said none was left), no look of its own
    assert spent[10] == 7, spent


def test_the_contract_reads_its_brief_in_the_message_that_drops_the_column(segments_at):
    """On the command's own connection: the phase, the start, then the drop, whose message also reads
    what the command prints after it (the same lines as a brief read afterwards)."""
    from io import StringIO

    from django.core.management import call_command
    from django.test.utils import CaptureQueriesContext

    from segments.switch import status

    segments_at("expanded")
    swapped_with_legacy_vectors(50)
    out = StringIO()
    with CaptureQueriesContext(connection) as queries:
        call_command("embedding_switch", "contract", "--confirm", stdout=out)
    sent = [query["sql"] for query in queries.captured_queries]
    assert len(sent) == 3, sent
    assert "LOCK TABLE segments IN SHARE MODE" in sent[1]
    assert "DROP COLUMN embedding_legacy" in sent[2] and "django_migrations" in sent[2].rsplit("DROP COLUMN", 1)[1]
    printed = out.getvalue().splitlines()
    assert printed[-3:] == [f"  {line}" for line in status.brief()], printed
    assert printed[-3] == "  phase: final"


def test_each_call_of_the_contracts_server_loop_answers_with_the_throttles_look(segments_at, monkeypatch):
    from segments.switch import server_loop
    from segments.switch.throttle import Throttle

    segments_at("expanded")
    swapped_with_legacy_vectors(300)
    monkeypatch.setattr(server_loop, "SECONDS_PER_CALL", 0.0)  # a call a batch: many calls
    own, observed = [], []
    read, observe = Throttle._read, Throttle.observe
    monkeypatch.setattr(Throttle, "_read", lambda self: own.append(1) or read(self))
    monkeypatch.setattr(Throttle, "observe", lambda self, row: observed.append(row) or observe(self, row))

    result = steps.contract(confirmed=True, rows_per_transaction=20)

    assert result.details["legacy_vectors_cleared"] == 300
    assert len(observed) >= 16  # the contract's look at the table, then the 15 clearing calls at least, each with one
    assert len(own) <= 1  # after a VACUUM's pause, at most: the first call's look came with the look at the table
    first, *calls = observed
    assert isinstance(first[0], int) and json.loads(first[2]) == []  # read with other reads: as JSON text
    assert all(isinstance(wal, int) and isinstance(replicas, list) for wal, _pause, replicas in calls)


def test_several_reads_go_as_one_statement_each_answering_its_rows_in_its_order():
    connection.ensure_connection()
    raw = connector("default")("reads")
    raw.autocommit = True
    try:
        with raw.cursor() as cursor:
            before = round_trips.round_trips(raw)
            found = round_trips.reads(cursor, "SELECT 1, 'one'",
                                      ("SELECT x, x * %s FROM generate_series(1, 3) AS x ORDER BY x DESC", [10]),
                                      "SELECT 1 WHERE false",
                                      "SELECT ARRAY['a', 'b'], NULL, true, 'it''s 100%'")
        assert round_trips.round_trips(raw) - before == 1
        assert found == [[(1, "one")], [(3, 30), (2, 20), (1, 10)], [], [(["a", "b"], None, True, "it's 100%")]]
    finally:
        raw.close()


def test_the_first_batchs_look_at_the_model_ledger_is_one_message_and_its_commit():
    from embeddings.writer import VectorWriter

    connection.ensure_connection()
    raw = connector("default")("writer")
    raw.autocommit = True
    identity = HashingEncoder().model_identity()
    try:
        with raw.cursor() as cursor:  # the column's type, as the engine knows it before its first batch
            storage = VectorWriter(raw, "embedding", 384, identity=identity)._column_type(cursor)
        spent = []
        for _ in range(2):  # the column's first write records the model; the next finds it recorded
            writer = VectorWriter(raw, "embedding", 384, identity=identity, type_name=storage)
            before = round_trips.round_trips(raw)
            with raw.cursor() as cursor:
                writer.resolve(cursor)
            spent.append(round_trips.round_trips(raw) - before)
        assert spent == [3, 2]  # lock and read; the record (and its read) on a first write; the commit
    finally:
        raw.close()
