"""benchmarks/prefix.py end to end on tiny random models: both configurations of both workloads are
measured, the cache-off engine never hits, and the report lands as JSON and a chart."""

from __future__ import annotations

import json

import pytest

from benchmarks.prefix import main

TINY_RUN = ["--tenants", "4", "--requests-per-tenant", "3", "--system-tokens", "40", "--arrival-seconds", "0.5",
            "--conversations", "2", "--turns", "3", "--output-tokens", "4", "--repeats", "1"]


@pytest.mark.parametrize("model", ["random:tiny", "tiny"])  # seeded token ids; the chat template
def test_the_prefix_benchmark_measures_the_cache_on_and_off(model, tmp_path):
    report = main(["--model", model, *TINY_RUN, "--out", str(tmp_path)])

    assert json.loads((tmp_path / "prefix.json").read_text()) == report
    assert (tmp_path / "prefix.png").stat().st_size > 0
    for workload, requests in (("shared prompt", 4 * 3), ("multi-turn", 2 * 3)):
        rows = report["workloads"][workload]
        on, off = rows["cache on"], rows["cache off"]
        assert on["hit_rate"] > 0 and off["hit_rate"] == 0
        # The requests' own counts agree with the scheduler's per-tenant ones.
        assert on["cached_tokens"] == on["scheduler_cached_tokens"] > 0 and off["scheduler_cached_tokens"] == 0
        for row in (on, off):
            assert row["requests"] == requests and row["output_tokens"] == requests * 4
            assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["tokens_per_second"] > 0
        assert set(rows["ratios"]) == {"ttft_p50", "ttft_p99", "tokens_per_second"}
        # Both engines get prompts of the same lengths: the same work, cached or not.
        assert on["prompt_tokens"] == off["prompt_tokens"]
    assert set(report["goals"]) == {"ttft_p50", "tokens_per_second"}
