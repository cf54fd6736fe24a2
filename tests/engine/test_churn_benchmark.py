"""benchmarks/churn.py end to end on a tiny random model: both engines serve the whole stream, only
the one whose pool holds a quarter of the adapters loads any during it, and the report lands as
JSON and a chart."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks.churn import adapter_ranks, main, pool_budgets, request_stream, write_model

TINY_RUN = ["--hidden", "64", "--adapters", "16", "--requests", "24", "--capacity-requests", "8",
            "--prompt-tokens", "16", "--output-tokens", "4", "--repeats", "1"]


def test_the_churn_benchmark_measures_a_quarter_pool_against_all_resident(tmp_path):
    report = main([*TINY_RUN, "--out", str(tmp_path)])

    assert json.loads((tmp_path / "churn.json").read_text()) == report
    assert (tmp_path / "churn.png").stat().st_size > 0
    churn, resident = report["runs"]["churn"], report["runs"]["all resident"]
    for row in (churn, resident):
        assert row["requests"] == 24 and row["output_tokens"] == 24 * 4
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["tokens_per_second"] > 0
        assert row["disk_loads"] == 0  # every adapter was in host RAM before the runs
    assert resident["slot_loads"] == resident["evictions"] == 0 and resident["loads_per_second"] == 0
    assert churn["slot_loads"] > 0 and churn["loads_per_second"] > 0
    pools = report["pools"]
    assert pools["churn"]["lora_pool_bytes"] == pools["all resident"]["lora_pool_bytes"] // 4
    # The arrivals come at 70% of the all-resident engine's rate on the closed burst.
    capacity = report["capacity"]["all resident"]
    assert capacity["requests"] == 8
    assert report["arrival_rate_per_second"] == pytest.approx(0.7 * capacity["requests_per_second"], rel=1e-2)
    assert set(report["ratios"]) == {"ttft_p50", "ttft_p99", "tokens_per_second"}
    assert report["ratios"]["ttft_p99"] == round(churn["ttft_p99_s"] / resident["ttft_p99_s"], 2)
    assert set(report["goals"]) == {"ttft_p99", "tokens_per_second"}
    assert all(isinstance(goal["met"], bool) for goal in report["goals"].values())


def test_ranks_are_a_quarter_each_in_an_order_apart_from_popularity():
    ranks = adapter_ranks(256, seed=0)
    assert Counter(ranks) == {8: 64, 16: 64, 32: 64, 64: 64}
    assert ranks != sorted(ranks) and ranks != [8, 16, 32, 64] * 64  # shuffled


def test_the_stream_is_zipf_over_adapters_with_poisson_arrivals():
    stream = request_stream(adapters=64, requests=4000, rate=20.0, prompt_tokens=8, seed=0)
    counts = Counter(r.adapter for r in stream)
    # Zipf s=1: adapter 0 about twice adapter 1, about ten times adapter 9.
    assert counts[0] / counts[1] == pytest.approx(2, rel=0.25) and counts[0] / counts[9] == pytest.approx(10, rel=0.3)
    assert stream[-1].at / len(stream) == pytest.approx(1 / 20, rel=0.1)
    assert all(len(r.prompt) == 8 for r in stream)
    assert {r.at for r in request_stream(adapters=4, requests=8, rate=0.0, prompt_tokens=8, seed=0)} == {0.0}


def test_a_pool_too_small_for_the_largest_adapter_is_refused(tmp_path):
    model = write_model(tmp_path, hidden=64, layers=2)
    with pytest.raises(SystemExit, match="raise --pool-fraction or --adapters"):
        pool_budgets(model, adapter_ranks(8, seed=0), 0.25)
