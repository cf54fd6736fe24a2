"""The GPU run's harness on this CPU: the engine benchmark end to end on the tiny random model, a
failing adapter count recorded while the next one still runs, and gpu_check.sh refusing cleanly
where no CUDA device is visible."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import engine_gpu

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TINY_RUN = ["--model", "random:tiny", "--device", "cpu", "--dtype", "float32", "--requests", "4",
            "--prompt-tokens", "8-24", "--output-tokens", "4", "--warmup-runs", "0", "--commit", "test"]


def test_the_engine_benchmark_measures_each_adapter_count(tmp_path):
    report = engine_gpu.main([*TINY_RUN, "--adapters", "0,2", "--out", str(tmp_path)])

    assert report["status"] == "ok", report
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [run["adapters"] for run in saved["runs"]] == [0, 2]
    for run in saved["runs"]:
        assert run["status"] == "ok"
        assert run["output_tokens"] == 4 * 4  # every request ran to its length
        assert run["tokens_per_second"] > 0
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"]
        assert 0 < run["itl_p50_ms"] <= run["itl_p99_ms"]
        assert run["sanity"]["finite_logprobs"]
    assert saved["runs"][1]["sanity"]["adapter_changes_logprobs"]  # the LoRA term really ran
    memory = saved["memory"]["after_runs"]
    assert memory["weights"] > 0 and memory["kv_cache"] > 0 and memory["adapter_pool"] > 0
    assert saved["environment"]["commit"] == "test"

    text = (tmp_path / "RESULTS-gpu.md").read_text()
    assert text.startswith(engine_gpu.HEADER)
    for run in saved["runs"]:  # the table holds the JSON's numbers
        row = f"| {run['adapters']} | {run['tokens_per_second']} |"
        assert row in text
        assert f"{run['itl_p50_ms']} / {run['itl_p99_ms']}" in text
    assert "KV cache" in text and "adapter slots (2 x rank 16)" in text


def test_a_count_that_fails_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    measure = engine_gpu.measure

    def failing_for_one(engine, workload, names, count, warmup_runs):
        if count == 1:
            engine.add_request([5, 6, 7], request_id="left-behind")  # a run that dies mid-way
            raise RuntimeError("simulated CUDA failure")
        return measure(engine, workload, names, count, warmup_runs)

    monkeypatch.setattr(engine_gpu, "measure", failing_for_one)
    report = engine_gpu.main([*TINY_RUN, "--adapters", "1,0", "--out", str(tmp_path)])

    failed, measured = report["runs"]
    assert failed["status"] == "error" and "simulated CUDA failure" in failed["error"]
    assert measured["status"] == "ok" and measured["output_tokens"] == 16  # the failed run's request was dropped
    assert report["status"] == "failed"
    text = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "| 1 | - |" in text and "## Errors" in text and "simulated CUDA failure" in text


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_the_script_without_cuda_fails_cleanly_and_runs_nothing(tmp_path):
    committed = ROOT / "benchmarks" / "RESULTS-gpu.md"
    before = committed.read_bytes() if committed.exists() else None
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable, "LORAFLEET_COMMIT": "test"}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)

    assert done.returncode != 0
    assert "no CUDA device is visible" in done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^env +FAILED .*missing:.*CUDA-device", summary, re.M)
    for step in ("kernel tests", "kernel table", "engine"):
        assert re.search(rf"^{step} +NOT RUN .*no CUDA device", summary, re.M), summary
    assert "gpu_check: FAILED" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.txt"]
    assert (committed.read_bytes() if committed.exists() else None) == before  # nothing copied over it


def test_the_committed_results_file_has_the_header_a_run_writes():
    assert (ROOT / "benchmarks" / "RESULTS-gpu.md").read_text().startswith(engine_gpu.HEADER)
