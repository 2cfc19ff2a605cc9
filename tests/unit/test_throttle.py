"""The throttle's logic without a database: the token bucket, the lag tracker, and the waits, with a
scripted database standing in for the one statement a look runs."""
import threading
import time

import pytest

from segments.switch.throttle import (
    LagTracker, Replica, Throttle, TokenBucket, parse_max_replica_lag, parse_rows_per_second,
)


def replica(replayed, replay_lag=None, name="walreceiver", address="10.0.0.7", pid=41):
    return Replica(pid, name, address, replayed, replay_lag)


# --- the token bucket ---------------------------------------------------------------------------

def test_the_bucket_lets_one_second_of_rows_go_at_once_then_holds_to_the_rate():
    bucket = TokenBucket(500, now=0.0)
    assert bucket.wait(300, 0.0) == 0 and bucket.wait(200, 0.0) == 0  # one second's worth at once
    assert bucket.wait(100, 0.0) == pytest.approx(0.2)  # then 100 rows take 0.2 s to earn
    assert bucket.wait(100, 0.1) == pytest.approx(0.1)  # asking again does not take anything meanwhile
    assert bucket.wait(100, 0.2) == 0


def test_a_batch_larger_than_the_bucket_goes_when_it_is_full_and_the_next_pays_its_debt():
    bucket = TokenBucket(500, now=0.0)
    assert bucket.wait(1000, 0.0) == 0  # a full bucket lets a 1,000-row batch go: 500 rows of debt
    assert bucket.wait(1000, 0.0) == pytest.approx(2.0)  # the debt and a full bucket: 2 s
    assert bucket.wait(1000, 2.0) == 0


def test_over_a_long_run_the_rate_is_the_cap():
    bucket, now, rows = TokenBucket(250, now=0.0), 0.0, 0
    while now < 60:
        wait = bucket.wait(100, now)
        if wait:
            now += wait
        else:
            rows += 100
    assert rows / 60 == pytest.approx(250, rel=0.03)


def test_an_idle_bucket_holds_no_more_than_one_second_of_rows():
    bucket = TokenBucket(100, now=0.0)
    assert bucket.wait(100, 0.0) == 0
    assert bucket.wait(100, 3600.0) == 0  # an hour idle: one second's worth, not 360,000 rows
    assert bucket.wait(100, 3600.0) == pytest.approx(1.0)


# --- the lag tracker ----------------------------------------------------------------------------

def test_a_replica_that_has_replayed_the_current_position_has_no_lag_whatever_the_server_says():
    tracker = LagTracker()
    # replay_lag keeps its last, high sample after the standby caught up (measured: 3.3 s for 7 s)
    [lag] = tracker.observe(10.0, 5000, [replica(5000, replay_lag=3.3)])
    assert lag.seconds == 0


def test_the_lag_is_the_time_since_the_first_look_the_replica_has_not_replayed():
    tracker = LagTracker()
    assert tracker.observe(0.0, 100, [replica(100)])[0].seconds == 0
    assert tracker.observe(0.5, 200, [replica(150)])[0].seconds == pytest.approx(0.0)  # written after 0.0
    assert tracker.observe(1.0, 300, [replica(150)])[0].seconds == pytest.approx(0.5)
    # replay paused, nothing more written: the server's replay_lag stays put, the real lag grows
    assert tracker.observe(4.0, 300, [replica(150, replay_lag=0.6)])[0].seconds == pytest.approx(3.5)
    assert tracker.observe(5.0, 300, [replica(200, replay_lag=0.6)])[0].seconds == pytest.approx(4.0)
    assert tracker.observe(5.5, 300, [replica(300, replay_lag=4.2)])[0].seconds == 0


def test_at_the_first_looks_of_a_replica_already_behind_the_servers_sample_is_taken_when_larger():
    tracker = LagTracker()
    [lag] = tracker.observe(0.0, 900, [replica(100, replay_lag=7.5)])
    assert (lag.seconds, lag.tracked) == (7.5, 0.0)
    [lag] = tracker.observe(9.0, 950, [replica(120, replay_lag=7.5)])  # still nothing of ours replayed
    assert (lag.seconds, lag.tracked) == (9.0, 9.0)
    [lag] = tracker.observe(9.5, 960, [replica(920, replay_lag=12.0)])  # it replayed our first look
    assert lag.seconds == pytest.approx(9.5)  # so it lacks nothing older: the sample is capped at 9.5 s
    [lag] = tracker.observe(10.0, 960, [replica(950, replay_lag=12.0)])
    assert lag.seconds == pytest.approx(1.0)  # it replayed the look at 9.0 s: the sample, capped at 1 s


def test_a_look_long_after_the_write_takes_the_servers_sample_up_to_the_last_replayed_look():
    tracker = LagTracker()
    tracker.observe(0.0, 100, [replica(100)])
    # written at 0.1 s; the next look comes at 3.0 s and is the first to see it
    [lag] = tracker.observe(3.0, 200, [replica(100, replay_lag=2.9)])
    assert (lag.seconds, lag.tracked) == (pytest.approx(2.9), 0.0)
    [lag] = tracker.observe(3.0, 200, [replica(100, replay_lag=40.0)])  # a stale sample: capped
    assert lag.seconds == pytest.approx(3.0)


def test_each_replica_has_its_own_lag_and_the_memory_keeps_what_the_slowest_has_not_replayed():
    tracker = LagTracker()
    for second in range(10):
        fast, slow = tracker.observe(float(second), 100 * (second + 1), [
            replica(100 * (second + 1), pid=1), replica(100, pid=2)])
    assert fast.seconds == 0 and slow.seconds == pytest.approx(8.0)
    assert list(tracker.positions)[0] == 100  # the slowest's anchor stays
    tracker.observe(10.0, 1100, [replica(1100, pid=1), replica(1100, pid=2)])
    assert list(tracker.positions) == [1100]


def test_hidden_positions_fall_back_to_the_servers_sample_or_nothing():
    tracker = LagTracker()
    lags = tracker.observe(0.0, 500, [replica(None, replay_lag=2.5, pid=1), replica(None, pid=2)])
    assert [(lag.seconds, lag.tracked) for lag in lags] == [(2.5, None), (0.0, None)]


def test_the_memory_is_bounded():
    tracker = LagTracker(remembered=50)
    for second in range(500):
        tracker.observe(float(second), second + 1000, [replica(0)])
    assert len(tracker.positions) == 50


# --- the throttle, with a scripted database ------------------------------------------------------

class ScriptedDatabase:
    """Answers a look with what the test set: the WAL position, the pause, the replicas."""

    def __init__(self):
        self.position, self.pause, self.replicas = 1000, None, []
        self.looks = 0
        self.connections = 0
        self.answer = None  # an Event a look waits for before it answers (None: at once)
        self.asked = threading.Event()  # a look has been asked

    def set(self, position=None, pause=None, replicas=None):
        if position is not None:
            self.position = position
        self.pause = pause
        self.replicas = replicas if replicas is not None else self.replicas

    def connect(self, role):
        assert role == "throttle"
        self.connections += 1
        return FakeConnection(self)


class FakeConnection:
    def __init__(self, database):
        self.database, self.autocommit, self.closed = database, False, False

    def cursor(self):
        return FakeCursor(self.database)

    def close(self):
        self.closed = True


class FakeCursor:
    def __init__(self, database):
        self.database = database

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, statement):
        assert "pg_stat_replication" in statement and "segments_switch_pause" in statement  # one statement
        self.database.looks += 1
        self.database.asked.set()
        if self.database.answer is not None:
            assert self.database.answer.wait(10)

    def fetchone(self):
        database = self.database
        return (database.position, database.pause, [
            {"pid": r.pid, "name": r.name, "address": r.address, "replayed": r.replayed, "replay_lag": r.replay_lag}
            for r in database.replicas])


PAUSE = {"by": "ops-host:4242", "at": "2026-12-06 12:03:04", "reason": "peak traffic"}


def throttle(database, **options):
    lines = []
    options = {"max_replica_lag": 1.0, "say": lines.append, "look_seconds": 0.02, **options}
    return Throttle(database.connect, **options), lines


def in_thread(throttle_, rows, stop):
    done = threading.Event()
    thread = threading.Thread(target=lambda: throttle_.before_write(rows, stop) and done.set(), daemon=True)
    thread.start()
    return thread, done


def test_it_returns_at_once_when_nothing_holds_it_back_and_looks_at_most_every_look_seconds():
    database = ScriptedDatabase()
    database.set(replicas=[replica(1000)])
    throttle_, lines = throttle(database, look_seconds=60)
    for _ in range(100):
        assert throttle_.before_write(1000) is True
    assert database.looks == 1 and database.connections == 1 and lines == []
    assert throttle_.waiting_for == ""


def test_while_one_writers_look_is_on_its_way_the_others_write_on_what_the_last_look_said():
    database = ScriptedDatabase()
    throttle_, _lines = throttle(database, look_seconds=0.05)
    assert throttle_.before_write(1000) is True  # the first look, answered at once
    time.sleep(0.06)  # what it said is old now
    database.answer, database.asked = threading.Event(), threading.Event()
    looking, looked = in_thread(throttle_, 1000, threading.Event())  # this writer's look waits for its answer
    assert database.asked.wait(5)
    started = time.monotonic()
    assert throttle_.before_write(1000) is True  # another writer: no second look, no wait for the first
    assert time.monotonic() - started < 0.5 and database.looks == 2 and not looked.is_set()
    database.answer.set()
    looking.join(5)
    assert looked.is_set()


def test_the_first_look_is_waited_for_by_every_writer():
    database = ScriptedDatabase()
    database.set(pause=PAUSE)
    database.answer = threading.Event()
    throttle_, _lines = throttle(database)
    stop = threading.Event()
    first, first_done = in_thread(throttle_, 1000, stop)
    assert database.asked.wait(5)
    second, second_done = in_thread(throttle_, 1000, stop)
    time.sleep(0.2)
    assert database.looks == 1 and not second_done.is_set()  # nothing said yet: it cannot decide
    database.answer.set()
    time.sleep(0.2)
    assert not first_done.is_set() and not second_done.is_set()  # the answer: paused
    stop.set()
    first.join(5), second.join(5)


def test_a_pause_holds_the_writes_back_and_says_so_until_it_is_lifted():
    database = ScriptedDatabase()
    database.set(pause=PAUSE)
    throttle_, lines = throttle(database)
    stop = threading.Event()
    thread, done = in_thread(throttle_, 100, stop)
    assert not done.wait(0.3)
    assert throttle_.waiting_for == "paused by ops-host:4242 since 2026-12-06 12:03:04 UTC (peak traffic)"
    database.set(pause=None)
    assert done.wait(2)
    thread.join()
    assert throttle_.waiting_for == ""
    assert lines[0] == ("Waiting: the backfill holds its writes back: paused by ops-host:4242 since "
                        "2026-12-06 12:03:04 UTC (peak traffic).")
    assert lines[1].startswith("Going on: the backfill writes again (it waited ") and len(lines) == 2


def test_a_lagging_replica_holds_the_writes_back_naming_it_and_how_far_behind():
    database = ScriptedDatabase()
    database.set(position=1000, replicas=[replica(1000)])
    throttle_, lines = throttle(database, what="the contract")
    assert throttle_.before_write(10) is True
    database.set(position=2000)  # written; the replica replays nothing more
    time.sleep(0.05)
    assert throttle_.before_write(10) is True  # the first look to see it: no lag measured yet
    time.sleep(1.1)
    stop = threading.Event()
    thread, done = in_thread(throttle_, 10, stop)
    assert not done.wait(1.3)
    waiting = throttle_.waiting_for
    assert waiting.startswith("replica 'walreceiver' at 10.0.0.7 is ") and waiting.endswith(" s behind (limit 1 s)")
    database.set(replicas=[replica(2000)])
    assert done.wait(2)
    thread.join()
    assert lines[0].startswith("Waiting: the contract holds its writes back: replica 'walreceiver' at 10.0.0.7 is ")


def test_a_stop_request_ends_the_wait_and_nothing_may_be_written():
    database = ScriptedDatabase()
    database.set(pause=PAUSE)
    throttle_, _ = throttle(database)
    stop = threading.Event()
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(throttle_.before_write(100, stop)))
    thread.start()
    time.sleep(0.1)
    stop.set()
    thread.join(2)
    assert outcome == [False]


def test_single_arrivals_of_a_follower_go_even_while_paused_and_its_catch_up_waits():
    database = ScriptedDatabase()
    database.set(pause=PAUSE)
    throttle_, _ = throttle(database, free_rows=100)
    assert throttle_.before_write(3) is True and database.looks == 0
    stop = threading.Event()
    thread, done = in_thread(throttle_, 1000, stop)
    assert not done.wait(0.2)
    stop.set()
    thread.join()


def test_the_rate_cap_spaces_the_batches_and_says_so_once():
    database = ScriptedDatabase()
    throttle_, lines = throttle(database, max_rows_per_second=1000)
    started = time.monotonic()
    for _ in range(4):
        assert throttle_.before_write(500) is True
    assert time.monotonic() - started >= 0.9  # 2,000 rows at 1,000/s with one second at once: >= 1 s
    assert throttle_.waiting_for == "rate cap 1,000 rows/s"
    assert lines == ["Rate cap: the backfill writes at most 1,000 rows/s."]


def test_a_database_that_cannot_be_reached_holds_nothing_back_and_is_said_once(caplog):
    import psycopg2

    def refuse(role):
        raise psycopg2.OperationalError("could not connect to server")

    throttle_ = Throttle(refuse, max_replica_lag=1.0, say=lambda line: None, look_seconds=0.0)
    assert throttle_.before_write(100) is True and throttle_.before_write(100) is True
    said = [record.getMessage() for record in caplog.records]
    assert said == ["the backfill could not look at the database's health (could not connect to server); it "
                    "writes on meanwhile"]


def test_hidden_replica_positions_are_said_once_with_the_grant():
    database = ScriptedDatabase()
    database.set(replicas=[replica(None)])
    throttle_, lines = throttle(database)
    assert throttle_.before_write(1) and throttle_.before_write(1)
    assert lines == ["The database hides its replicas' positions from this role: their lag cannot hold the writes "
                     "back. `GRANT pg_monitor TO <this role>;` lets it see them."]


@pytest.mark.parametrize("raw, value", [("2", 2.0), ("0.5", 0.5), ("off", None), ("OFF", None)])
def test_the_lag_limit_is_seconds_or_off(raw, value):
    assert parse_max_replica_lag(raw) == value


@pytest.mark.parametrize("raw", ["0", "-1", "soon"])
def test_a_lag_limit_of_zero_or_less_or_no_number_is_refused(raw):
    with pytest.raises(ValueError):
        parse_max_replica_lag(raw)


def test_the_rate_cap_is_a_positive_number():
    assert parse_rows_per_second("750") == 750.0
    for raw in ("0", "-5", "fast"):
        with pytest.raises(ValueError):
            parse_rows_per_second(raw)


@pytest.mark.parametrize("raw", ["0", "soon"])
def test_a_malformed_lag_setting_stops_start_up_naming_the_variable(raw):
    from tests.unit.test_settings import start

    result = start(BACKFILL_MAX_REPLICA_LAG=raw)
    assert result.returncode != 0
    assert f"BACKFILL_MAX_REPLICA_LAG='{raw}' is not a valid number of seconds above 0, or off" in result.stderr
