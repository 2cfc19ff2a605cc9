"""The contract stopped halfway and run again, and how it finds the values stored out of line."""
import psycopg2
import pytest
from django.core.management import call_command
from django.db import connection

from segments.models import SwitchEvent
from segments.schema import embedding_schema
from segments.switch import out_of_line, steps
from segments.switch.backfill import run_backfill


@pytest.fixture
def swapped_demo(segments_at, settings):
    """300 demo segments with legacy vectors (one very long), backfilled, indexed and swapped; the new
    column as `vector`, whose 1.5 kB values the longer segments keep out of line (halfvec's 776 bytes
    mostly stay in the row)."""
    from embeddings.fakes import HashingEncoder
    from segments import demo_data

    settings.EMBEDDING_STORAGE = "vector"
    segments_at("legacy")
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, 300, seed=5, legacy_column="embedding")
    call_command("migrate", verbosity=0)  # phase 1, as a deploy runs it
    encoder = HashingEncoder()
    run_backfill(encoder)
    steps.index()
    steps.swap(encoder=encoder)


def stored(sql):
    """{id: (md5 of the text, md5 of the vector)} of every segment."""
    return {row[0]: row[1:] for row in sql("SELECT id, md5(text), md5(embedding::text) FROM segments")}


class Interrupt(Exception):
    pass


class StopAfter:
    """A progress bar that interrupts the contract once `rows` rows have been reported."""

    def __init__(self, rows):
        self.rows, self.seen = rows, 0

    def update(self, count):
        self.seen += count
        if self.seen >= self.rows:
            raise Interrupt

    def close(self):
        pass


def test_contract_interrupted_while_clearing_resumes_and_keeps_every_value(swapped_demo, sql, monkeypatch):
    from segments.switch import server_loop

    monkeypatch.setattr(server_loop, "SECONDS_PER_CALL", 0.0)  # the server's loop answers after each batch
    before = stored(sql)

    with pytest.raises(Interrupt):
        steps.contract(confirmed=True, rows_per_transaction=20, progress_factory=lambda total: StopAfter(50))

    (left,), = sql("SELECT count(*) FROM segments WHERE embedding_legacy IS NOT NULL")
    assert embedding_schema().phase == "swapped" and 0 < left < 300
    assert SwitchEvent.objects.filter(step="contract-started").exists()

    result = steps.contract(confirmed=True, rows_per_transaction=20)

    assert result.done and embedding_schema().phase == "final"
    assert result.details["legacy_vectors_cleared"] == left
    assert stored(sql) == before


def test_size_test_before_postgresql_17_finds_every_out_of_line_value_and_else_only_compressed_ones(swapped_demo, sql):
    columns = ("text", "embedding", "metadata")
    with connection.cursor() as cursor:
        by_size = out_of_line.Rewrite(cursor, skip={"embedding_legacy"}, server_version=160000).where
    external = " OR ".join(f"pg_column_toast_chunk_id({c}) IS NOT NULL" for c in columns)
    compressed = " OR ".join(f"pg_column_compression({c}) IS NOT NULL" for c in columns)

    found = {row[0] for row in sql(f"SELECT id FROM segments WHERE {by_size}")}
    out_of_line_rows = {row[0] for row in sql(f"SELECT id FROM segments WHERE {external}")}
    compressed_rows = {row[0] for row in sql(f"SELECT id FROM segments WHERE {compressed}")}

    assert len(out_of_line_rows) > 10  # the demo's longer segments keep their new vector out of line
    assert out_of_line_rows <= found <= out_of_line_rows | compressed_rows


def test_a_batch_blocked_by_an_application_transaction_stops_the_contract_with_the_fix(swapped_demo, sql, monkeypatch):
    from segments.switch import contract
    from segments.switch.backfill.session import open_connection

    monkeypatch.setattr(contract, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(contract, "LOCK_ATTEMPTS", 2)
    link = contract.link_for("default")
    contract.drop_legacy_indexes(link, out=lambda line: None)  # what the contract does before its batches
    link.close()
    (first,), = sql("SELECT min(id) FROM segments")
    application = open_connection("default", "app")  # a transaction holding the first row's lock
    try:
        with application.cursor() as cursor:
            cursor.execute("SELECT id FROM segments WHERE id = %s FOR UPDATE", [first])
        with pytest.raises(contract.ContractInterrupted, match="contract --confirm` again when no transaction"):
            steps.contract(confirmed=True)
        (left,), = sql("SELECT count(*) FROM segments WHERE embedding_legacy IS NOT NULL")
    finally:
        application.rollback()
        application.close()
    assert embedding_schema().phase == "swapped" and left == 300  # the first batch held the first row

    steps.contract(confirmed=True)

    assert embedding_schema().phase == "final"


def _toast_bytes(sql):
    (size,), = sql("SELECT pg_total_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'segments'::regclass")
    return size


class SnapshotDuringClearing:
    """A progress bar that, at the first cleared batch, starts a REPEATABLE READ transaction of
    another session (a report over another table: no lock on segments) holding its snapshot for
    `seconds`: the legacy vectors cleared after it stay visible to it, so VACUUM cannot free them
    until it ends."""

    def __init__(self, seconds):
        from tests.migrations.test_concurrent_build import Holder

        self.holder = Holder(seconds, "SELECT count(*) FROM django_migrations",
                             isolation=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)

    def __call__(self, total):
        return self

    def update(self, count):
        if not self.holder.is_alive() and not self.holder.ended.is_set():
            self.holder.start()
            assert self.holder.holding.wait(10)

    def close(self):
        pass


def test_contract_waits_for_a_snapshot_older_than_its_clearing_names_it_and_then_gives_the_space_back(
    swapped_demo, sql, monkeypatch
):
    from segments.switch import server_loop

    monkeypatch.setattr(server_loop, "SECONDS_PER_CALL", 0.0)  # the snapshot is taken after the first batch
    toast_before, said = _toast_bytes(sql), []
    snapshot = SnapshotDuringClearing(seconds=3)

    result = steps.contract(out=said.append, confirmed=True, rows_per_transaction=20, progress_factory=snapshot)

    snapshot.holder.join()
    assert any(line.startswith(f"waiting for pid {snapshot.holder.pid} (") for line in said), said
    assert result.details["held_back_by"] == []
    assert _toast_bytes(sql) < 0.5 * toast_before


def test_contract_names_what_still_holds_the_space_after_its_wait(swapped_demo, sql, monkeypatch):
    from segments.switch import contract, server_loop

    monkeypatch.setattr(contract, "WAIT_FOR_OLDER_TRANSACTIONS_SECONDS", 1)
    monkeypatch.setattr(server_loop, "SECONDS_PER_CALL", 0.0)  # the snapshot is taken after the first batch
    toast_before, said = _toast_bytes(sql), []
    snapshot = SnapshotDuringClearing(seconds=60)
    try:
        result = steps.contract(out=said.append, confirmed=True, rows_per_transaction=20, progress_factory=snapshot)
        toast_during = _toast_bytes(sql)
    finally:
        snapshot.holder.release.set()
        snapshot.holder.join()

    assert embedding_schema().phase == "final"  # the column is dropped all the same
    assert [line.split(" (")[0] for line in result.details["held_back_by"]] == [f"pid {snapshot.holder.pid}"]
    assert any(line.startswith(f"NOT all the space came back: pid {snapshot.holder.pid}") for line in said), said
    assert toast_during >= 0.8 * toast_before  # what the snapshot could see stayed on disk
