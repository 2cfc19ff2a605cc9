"""`python -m benchmark.end_to_end` from end to end on the CPU, on a small table: the model saved, the
live-shaped table built in a server of its own, the real backfill command, every row verified, the GPU
check beside it, one JSON file (what docs/gpu-end-to-end.sh runs on a GPU machine)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_end_to_end_run_embeds_every_row_from_table_to_table(tmp_path):
    env = {name: value for name, value in os.environ.items() if name not in ("DATABASE_URL", "TEST_DATABASE_NAME")}
    done = subprocess.run([sys.executable, "-m", "benchmark.end_to_end", "--rows", "40", "--load-processes", "2",
                           "--gpu-check-args=--quick", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env={**env, "EMBEDDING_DEVICE": "cpu"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (written,) = tmp_path.glob("gpu-end-to-end-cpu-*.json")
    result = json.loads(written.read_text())
    figures = result["end_to_end"]
    assert figures["verified"] and figures["rows"] == 40 and figures["rows_embedded"] + figures["rows_blank"] == 40
    assert figures["backfill_rows_per_s"] > 0 and figures["backfill_device"] == "cpu"
    assert figures["pipeline_texts_per_s"] > 0 and figures["model_alone_texts_per_s"] > 0
    assert set(figures["steps_seconds"]) == {"model", "table", "backfill", "status", "gpu_check"}
    assert result["backfill"]["rows_embedded"] == figures["rows_embedded"] and result["gpu_check"]["quick"]
