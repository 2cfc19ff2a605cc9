"""A link that goes silent mid-batch (packets vanish, no reset arrives: a home router's NAT entry gone,
or a local tunnel that stops forwarding and acknowledges everything itself, where TCP keepalives see
nothing wrong) is noticed by the backfill, the follower and the contract, which go on over a new
connection: nothing lost, nothing written twice, no claim left held.

The link is the project's delay proxy (benchmark/delay_proxy.py), told to stop forwarding on the
connections open at that moment and close none of them. The deadlines are made shorter to keep the
suite quick; the defaults notice a silent link within 30 s (the first test).
"""
import threading
import time

import psycopg2
import pytest
from django.db import connection

from benchmark.delay_proxy import DelayProxy
from embeddings.fakes import HashingEncoder
from segments.switch import contract, server_loop, steps
from segments.switch.backfill import Tuning, connector, count_pending, run_backfill, session
from tests.conftest import wait_until
from tests.embeddings.conftest import add_segments, sentences, swapped_with_legacy_vectors
from tests.embeddings.test_follow import follower_running

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

NOTICED_WITHIN = 30  # seconds: the engine's default deadline (statement_timeout and its grace) fits in it


class SlowHashing(HashingEncoder):
    """A HashingEncoder taking `delay` seconds a call: a run long enough to go silent in the middle of."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def encode_documents(self, texts, *args, **kwargs):
        time.sleep(self.delay)
        return super().encode_documents(texts, *args, **kwargs)


@pytest.fixture
def proxy():
    params = connection.get_connection_params()
    with DelayProxy(f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}") as link:
        yield link


@pytest.fixture
def write_log():
    """write_log() installs a log of every write of a vector into embedding_384 (an ALWAYS trigger: replica
    mode included); its result, called, gives {segment id: times written}."""
    def install():
        with connection.cursor() as cursor:
            cursor.execute("""
                CREATE TABLE test_write_log (segment_id int);
                CREATE FUNCTION test_log_write() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN INSERT INTO test_write_log VALUES (NEW.id); RETURN NEW; END $$;
                CREATE TRIGGER test_log_write AFTER UPDATE OF embedding_384 ON segments FOR EACH ROW
                    WHEN (NEW.embedding_384 IS NOT NULL) EXECUTE FUNCTION test_log_write();
                ALTER TABLE segments ENABLE ALWAYS TRIGGER test_log_write;
            """)
        return writes

    def writes():
        with connection.cursor() as cursor:
            cursor.execute("SELECT segment_id, count(*) FROM test_write_log GROUP BY segment_id")
            return dict(cursor.fetchall())

    yield install
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS test_write_log; DROP TRIGGER IF EXISTS test_log_write ON segments; "
                       "DROP FUNCTION IF EXISTS test_log_write()")


def claims_left():
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM embeddings_backfill_claim")
        return cursor.fetchone()[0]


def embedded():
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM segments WHERE embedding_384 IS NOT NULL")
        return cursor.fetchone()[0]


def test_by_default_a_silent_link_is_noticed_within_30_seconds():
    assert session.STATEMENT_TIMEOUT_SECONDS + session.LINK_GRACE_SECONDS <= NOTICED_WITHIN
    assert server_loop.SECONDS_PER_CALL + 5 + server_loop.LINK_GRACE_SECONDS <= NOTICED_WITHIN  # lock_timeout 5 s


@pytest.mark.parametrize("write_ahead", [False, True], ids=["sent-with-its-batch", "sent-ahead"])
def test_the_backfill_notices_a_silent_link_and_finishes_every_row_once(segments_at, proxy, write_log, monkeypatch,
                                                                        write_ahead):
    monkeypatch.setattr(session, "STATEMENT_TIMEOUT_SECONDS", 3)
    monkeypatch.setattr(session, "LINK_GRACE_SECONDS", 2)
    segments_at("expanded")
    ids = add_segments(sentences(3000))
    writes = write_log()
    results = []
    thread = threading.Thread(target=lambda: results.append(run_backfill(
        SlowHashing(0.2), batch_size=100, connect=connector("default", through=("127.0.0.1", proxy.port)),
        tuning=Tuning(write_ahead=write_ahead))))
    thread.start()
    assert wait_until(lambda: embedded() >= 300, 30), "timed out"
    proxy.silence()
    silenced = time.monotonic()
    thread.join(NOTICED_WITHIN + 30)

    assert not thread.is_alive() and results, "the backfill did not get past the silent link"
    assert time.monotonic() - silenced < 5 + 15  # noticed within its deadline, then the rest of its work
    assert count_pending() == 0 and embedded() == len(ids)
    assert set(writes().values()) == {1}  # every segment written once
    assert claims_left() == 0


def test_the_follower_notices_a_silent_link_and_embeds_what_arrives_after_it(segments_at, proxy, monkeypatch):
    monkeypatch.setattr(session, "STATEMENT_TIMEOUT_SECONDS", 2)
    monkeypatch.setattr(session, "LINK_GRACE_SECONDS", 1)
    segments_at("expanded")
    with follower_running(connect=connector("default", through=("127.0.0.1", proxy.port)), poll_seconds=0.5):
        add_segments(sentences(20))
        assert wait_until(lambda: count_pending() == 0, 30), "timed out"
        proxy.silence()
        add_segments(sentences(20, seed=3))
        assert wait_until(lambda: count_pending() == 0, 30), "timed out"
    assert embedded() == 40
    assert wait_until(lambda: claims_left() == 0, 30), "timed out"


def test_the_contract_notices_a_silent_link_and_finishes_keeping_every_value(segments_at, proxy, monkeypatch):
    monkeypatch.setattr(server_loop, "SECONDS_PER_CALL", 0.05)
    monkeypatch.setattr(server_loop, "LINK_GRACE_SECONDS", 2)
    segments_at("expanded")
    swapped_with_legacy_vectors(400)
    with connection.cursor() as cursor:
        cursor.execute("SELECT md5(string_agg(id || text || embedding::text, ',' ORDER BY id)) FROM segments")
        before = cursor.fetchone()[0]
    dsn = connection.get_connection_params()
    monkeypatch.setattr(contract, "link_for", lambda using: server_loop.ServerLink(lambda: psycopg2.connect(
        host="127.0.0.1", port=proxy.port, dbname=dsn["dbname"], user=dsn.get("user") or "postgres",
        options=f"-c lock_timeout={contract.LOCK_TIMEOUT}")))

    class SilenceOnce:
        """A progress bar that makes the link go silent after the first cleared rows."""

        def update(self, count):
            if not proxy.forwarder.links or getattr(self, "done", False):
                return
            self.done = True
            proxy.silence()

        def close(self):
            pass

    silencer = SilenceOnce()  # one for the clearing and the moving: the link goes silent once
    result = steps.contract(confirmed=True, rows_per_transaction=5, progress_factory=lambda total: silencer)

    assert result.done and result.details["legacy_vectors_cleared"] == 400
    with connection.cursor() as cursor:
        cursor.execute("SELECT md5(string_agg(id || text || embedding::text, ',' ORDER BY id)) FROM segments")
        assert cursor.fetchone()[0] == before
