"""The contract's clearing yields too: while the switch is paused it clears nothing, and it says so;
resumed, it completes and keeps every value."""
import threading
import time

import pytest

from segments.schema import embedding_schema
from segments.switch import steps
from tests.migrations.test_contract import stored, swapped_demo  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)


def legacy_left(sql):
    return sql("SELECT count(*) FROM segments WHERE embedding_legacy IS NOT NULL")[0][0]


def test_a_paused_contract_clears_nothing_until_resumed_then_completes(swapped_demo, sql):  # noqa: F811
    before, to_clear = stored(sql), legacy_left(sql)
    steps.pause(reason="month-end reports", by="ops-host:4242")
    lines, outcome = [], {}

    def contract():
        from django.db import connections

        try:
            outcome["result"] = steps.contract(out=lines.append, confirmed=True, rows_per_transaction=20,
                                               max_replica_lag=None)
        except BaseException as exc:  # the test reports it
            outcome["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=contract)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("Waiting: the contract holds its writes back") for line in lines):
            assert thread.is_alive() and time.monotonic() < deadline, (lines, outcome)
            time.sleep(0.1)
        time.sleep(1.5)
        assert thread.is_alive() and legacy_left(sql) == to_clear
    finally:
        steps.resume()
        thread.join(120)
    assert "error" not in outcome, outcome
    assert ("Waiting: the contract holds its writes back: paused by ops-host:4242 since "
            in next(line for line in lines if line.startswith("Waiting:")))
    assert any(line.startswith("Going on: the contract writes again (it waited ") for line in lines)
    assert outcome["result"].done and embedding_schema().phase == "final"
    assert outcome["result"].details["legacy_vectors_cleared"] == to_clear
    assert stored(sql) == before
