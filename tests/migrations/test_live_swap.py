"""The swap while the application keeps writing, the honest undo, and the online contract."""
import threading
import time

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from segments.models import SwitchEvent
from segments.schema import embedding_schema
from segments.switch import steps
from segments.switch.backfill import run_backfill
from segments.switch.backfill.session import open_connection
from tests.embeddings.conftest import add_segments, sentences, stored_vectors


class Writer(threading.Thread):
    """The application: inserts a segment or edits a text about `rate` times a second, each in its
    own transaction on its own connection, recording every failure and the slowest write."""

    def __init__(self, rate=10.0):
        super().__init__(daemon=True)
        self.interval = 1.0 / rate
        self.stop = threading.Event()
        self.errors, self.writes, self.slowest = [], 0, 0.0
        self.inserted, self.edited = [], []

    def run(self):
        conn = open_connection("default", "app")
        conn.autocommit = True
        number = 0
        try:
            while not self.stop.is_set():
                number += 1
                started = time.perf_counter()
                try:
                    with conn.cursor() as cursor:
                        if number % 2:
                            cursor.execute(
                                "INSERT INTO segments (video_id, start_sec, end_sec, text) "
                                "VALUES ('live', %s, %s, %s) RETURNING id",
                                [number, number + 1, f"live insert {number}: fasting and ketones"])
                            self.inserted.append(cursor.fetchone()[0])
                        else:
                            cursor.execute(
                                "UPDATE segments SET text = text || %s WHERE id = "
                                "(SELECT id FROM segments WHERE video_id <> 'live' ORDER BY random() LIMIT 1) "
                                "RETURNING id", [f" (edit {number})"])
                            self.edited.append(cursor.fetchone()[0])
                    self.writes += 1
                except Exception as exc:  # every failure is a finding of the test
                    self.errors.append(repr(exc))
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.stop.wait(self.interval)
        finally:
            conn.close()

    def finish(self):
        self.stop.set()
        self.join(10)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.finish()  # whatever happened: a writer left running would write into the next test's table


def texts_and_vectors(column="embedding"):
    vectors = stored_vectors(column)
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        return dict(cursor.fetchall()), vectors


def assert_every_vector_current(encoder, column="embedding"):
    texts, vectors = texts_and_vectors(column)
    missing = [i for i in texts if vectors[i] is None]
    assert missing == []
    ids = list(texts)
    fresh = np.asarray(encoder.encode_documents([texts[i] for i in ids]), dtype=np.float32)
    stored = np.stack([vectors[i] for i in ids])
    cosine = (fresh * stored).sum(axis=1)
    assert cosine.min() >= 0.999, f"stale vector for segment {ids[int(cosine.argmin())]}"


def embedded_and_indexed(encoder, rows=300):
    """The expanded phase, `rows` segments embedded by a first backfill pass with `encoder`, the HNSW
    index built."""
    add_segments(sentences(rows))
    run_backfill(encoder)
    steps.index()
    return encoder


@pytest.fixture
def expanded_and_indexed(segments_at):
    from embeddings.fakes import HashingEncoder

    segments_at("expanded")
    return embedded_and_indexed(HashingEncoder())


@pytest.mark.end_to_end
@pytest.mark.slow
def test_swap_goes_through_while_the_application_inserts_and_edits(segments_at, minilm):
    # The real model throughout: its speed decides how many late rows fit under the lock.
    segments_at("expanded")
    embedded_and_indexed(minilm, rows=150)
    results, failures = [], []
    with Writer(rate=10) as writer:
        time.sleep(1.0)  # the application is writing before the swap starts, and goes on throughout
        for _attempt in range(3):  # within 3 runs of the documented command
            try:
                results.append(steps.swap(encoder=minilm))
                break
            except CommandError as exc:
                failures.append(str(exc))
        time.sleep(1.0)

    assert results, failures
    swap = results[0].details
    print(f"\nswap: writes blocked {swap['writes_blocked_ms']:.1f} ms, reads blocked "
          f"{swap['reads_blocked_ms']:.1f} ms, {swap['left_pending']} left pending and embedded after the commit, "
          f"round {swap['rounds']}; application writes: {writer.writes}, slowest {writer.slowest * 1000:.0f} ms")
    assert embedding_schema().phase == "swapped"
    assert writer.errors == [] and writer.writes > 20
    assert swap["writes_blocked_ms"] < 1000 and writer.slowest < 1.0
    # Rows inserted or edited after the swap wait for the next pass (or the follower).
    run_backfill(minilm)
    assert_every_vector_current(minilm)


def test_swap_embeds_late_arrivals_right_after_its_commit_and_none_under_its_lock(expanded_and_indexed):
    encoder = expanded_and_indexed
    late = add_segments(["arrived after the last pass", "so did this one"])
    no_pass = lambda enc: None  # noqa: E731  (no backfill pass: the two rows arrive at the swap)

    result = steps.swap(encoder=encoder, backfill=no_pass)

    assert result.details["left_pending"] == 2 and result.details["embedded_after"] == 2
    assert "none was embedded under the lock" in result.message
    vectors = stored_vectors("embedding")
    assert all(vectors[i] is not None for i in late)
    assert_every_vector_current(encoder)


def test_swap_gives_up_cleanly_when_more_rows_arrive_than_it_embeds_right_after_the_commit(expanded_and_indexed, schema_dump):
    encoder = expanded_and_indexed
    add_segments(sentences(50, seed=7))
    before = schema_dump()

    with pytest.raises(CommandError, match=r"gave up after 2 rounds.*pending at each try: 50, 50"):
        steps.swap(encoder=encoder, backfill=lambda enc: None, rounds=2, left_seconds=1e-9)

    assert schema_dump() == before
    assert embedding_schema().phase == "expanded"


def test_undo_after_edits_serves_no_stale_legacy_vector(segments_at, sql):
    from embeddings.fakes import HashingEncoder

    segments_at("expanded")
    ids = add_segments(sentences(20))
    sql("UPDATE segments SET embedding = ('[' || array_to_string(array_fill(0.5::real, ARRAY[1536]), ',') || ']')::vector")
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
    edited, untouched = ids[:5], ids[5:]
    sql("UPDATE segments SET text = text || ' (corrected)' WHERE id = ANY(%s)", [edited])
    sql("INSERT INTO segments (video_id, start_sec, end_sec, text) VALUES ('new', 0, 1, 'added after the swap')")

    result = steps.undo()

    assert embedding_schema().phase == "expanded"
    legacy = stored_vectors("embedding")
    assert [i for i in edited if legacy[i] is not None] == []
    assert [i for i in untouched if legacy[i] is None] == []
    assert result.details["legacy_lacking"] == 6  # 5 edited, 1 added after the swap


def test_undo_is_refused_once_the_contract_has_started(segments_at):
    from embeddings.fakes import HashingEncoder

    segments_at("expanded")
    add_segments(sentences(10))
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
    SwitchEvent.objects.create(step="contract-started")

    with pytest.raises(CommandError, match="can no longer be undone"):
        steps.undo()
    assert embedding_schema().phase == "swapped"


def test_contract_requires_confirmation_and_changes_nothing_without_it(segments_at, schema_dump):
    from embeddings.fakes import HashingEncoder

    segments_at("expanded")
    add_segments(sentences(10))
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
    before = schema_dump()

    with pytest.raises(CommandError, match="--confirm"):
        call_command("embedding_switch", "contract", verbosity=0)

    assert schema_dump() == before


class LockWatcher(threading.Thread):
    """Samples pg_locks every 10 ms: the longest time any session held ACCESS EXCLUSIVE on segments,
    and the statement it was running then."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.longest, self.longest_query = 0.0, None

    def run(self):
        conn = open_connection("default", "lock watcher")
        conn.autocommit = True
        held_since = {}
        try:
            with conn.cursor() as cursor:
                while not self.stop.is_set():
                    cursor.execute("SELECT l.pid, a.query FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                                   "WHERE l.relation = to_regclass('segments') AND l.mode = 'AccessExclusiveLock' "
                                   "AND l.granted")
                    now = time.perf_counter()
                    queries = dict(cursor.fetchall())
                    held_since = {pid: held_since.get(pid, now) for pid in queries}
                    for pid, since in held_since.items():
                        if now - since >= self.longest:
                            self.longest, self.longest_query = now - since, queries[pid]
                    self.stop.wait(0.01)
        finally:
            conn.close()

    def finish(self):
        self.stop.set()
        self.join(10)


def _stored_values(sql):
    """{id: (md5 of the text, md5 of the vector)} of every segment."""
    return {row[0]: row[1:] for row in sql("SELECT id, md5(text), md5(embedding::text) FROM segments")}


@pytest.mark.slow
def test_contract_gives_the_disk_back_online_while_the_application_writes(segments_at, sql, settings):
    from embeddings.fakes import HashingEncoder
    from segments import demo_data

    # float32 vectors (1,544 bytes) go out of line, where the contract must move what blocks the
    # heap's truncation; a halfvec one (776 bytes) stays in the row
    settings.EMBEDDING_STORAGE = "vector"
    segments_at("legacy")
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, 8_000, seed=3, legacy_column="embedding")
    call_command("migrate", verbosity=0)  # phase 1, as a deploy runs it; records the size before
    (before,), = sql("SELECT (details->>'total_bytes')::bigint FROM segments_switch_event WHERE step = 'before'")
    encoder = HashingEncoder()
    run_backfill(encoder)
    steps.index()
    steps.swap(encoder=encoder)
    (out_of_line,), = sql("SELECT count(*) FROM segments WHERE pg_column_toast_chunk_id(embedding) IS NOT NULL "
                          "OR pg_column_toast_chunk_id(text) IS NOT NULL")
    values = _stored_values(sql)
    locks = LockWatcher()
    locks.start()
    try:
        with Writer(rate=10) as writer:
            result = steps.contract(confirmed=True)
    finally:
        locks.finish()
    after = result.details["total_bytes"]
    stages = ", ".join(f"{stage} {sizes['total_bytes'] / 2**20:.1f} MB (heap {sizes['heap_bytes'] / 2**20:.1f}, "
                       f"TOAST {sizes['toast_bytes'] / 2**20:.1f}, indexes {sizes['indexes_bytes'] / 2**20:.1f})"
                       for stage, sizes in result.details["sizes"].items())
    print(f"\ncontract: {before / 2**20:.1f} MB before the switch; {stages}; {after / 2**20:.1f} MB after the "
          f"column is dropped ({after / before:.0%}); longest ACCESS EXCLUSIVE {locks.longest * 1000:.0f} ms "
          f"({locks.longest_query!r}); application writes {writer.writes}, slowest {writer.slowest * 1000:.0f} ms; "
          f"{result.details['seconds']} s; held back by {result.details['held_back_by'] or 'nothing'}")
    assert embedding_schema().phase == "final"
    assert writer.errors == [] and writer.writes > 10
    assert after <= 0.40 * before
    assert locks.longest < 1.0 and writer.slowest < 1.0
    # the backfill stored >1000 new vectors out of line; each one the application left alone was moved
    assert out_of_line > 1000 and result.details["out_of_line_rows_moved"] >= out_of_line - len(writer.edited)
    written = set(writer.edited) | set(writer.inserted)
    assert {i: v for i, v in _stored_values(sql).items() if i not in written} == \
        {i: v for i, v in values.items() if i not in written}


def test_verify_reports_what_an_undo_would_lack(segments_at, sql):
    from embeddings.fakes import HashingEncoder
    from segments.switch.verify import verify

    segments_at("expanded")
    ids = add_segments(sentences(12))
    run_backfill(HashingEncoder())
    steps.index()
    steps.swap(encoder=HashingEncoder())
    sql("UPDATE segments SET text = text || ' (corrected)' WHERE id = ANY(%s)", [ids[:3]])

    report = verify(sample=5, encoder=HashingEncoder()).as_dict()

    assert report["checks"]["undo"]["legacy_vectors_lacking"] == 12  # none had a legacy vector here
    sql("UPDATE segments SET embedding_legacy = ('[' || array_to_string(array_fill(0.5::real, ARRAY[1536]), ',') "
        "|| ']')::vector WHERE id <> ALL(%s)", [ids[:3]])
    assert verify(sample=5, encoder=HashingEncoder()).as_dict()["checks"]["undo"]["legacy_vectors_lacking"] == 3
