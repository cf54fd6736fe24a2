"""The throughput benchmark's harness: interleaved runs are timed on their own clocks and each
does its whole workload, so the ratios the README quotes are measured the way it says."""

from __future__ import annotations

import pytest

from benchmarks.throughput import EngineRun, aa_ratios, make_workload, run_interleaved, with_adapters
from engine_daemon import Engine, EngineConfig
from tests.engine.builders import write_adapter


@pytest.fixture(scope="module")
def engines(tiny_llama, tmp_path_factory):
    adapter = write_adapter(tiny_llama, tmp_path_factory.mktemp("bench") / "a", r=4)
    made = []
    for _ in range(2):
        engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", max_loras=2,
                                     max_lora_rank=8, max_num_seqs=4))
        engine.add_adapter("a", str(adapter))
        made.append(engine)
    yield made
    for engine in made:
        engine.close()


def test_interleaved_runs_each_finish_their_workload_on_their_own_clock(engines, monkeypatch):
    workload = make_workload(6, 512, seed=3, min_prompt=3, max_prompt=20, min_out=2, max_out=9)
    plain, adapted = engines
    first_steps = [engine.stats.steps for engine in engines]
    runs = [EngineRun(plain, workload, "plain", 0), EngineRun(adapted, with_adapters(workload, ["a", None]), "lora", 1)]
    steps_taken = []
    original_step = EngineRun.step

    def recording_step(run):  # the order in which the runs take steps
        steps_taken.append(run.label)
        original_step(run)

    monkeypatch.setattr(EngineRun, "step", recording_step)
    results = run_interleaved(runs, turn_steps=2)

    expected = sum(r.max_tokens for r in workload)
    assert [r.output_tokens for r in results] == [expected, expected]
    # Same schedule: both took the same number of steps, in turns of two.
    assert [e.stats.steps - s for e, s in zip(engines, first_steps, strict=True)] == [len(steps_taken) // 2] * 2
    assert steps_taken[:6] == ["plain", "plain", "lora", "lora", "plain", "plain"]
    for result in results:
        # Own clock: first tokens come after some of its own time, and the clock ends where the last token did.
        assert 0 < min(result.ttft) <= max(result.ttft) <= result.seconds
        assert len(result.itl) == expected - len(workload)
        assert result.phases["decode_steps"] + result.phases["prefill_steps"] == len(steps_taken) // 2
    assert not plain.has_unfinished() and not adapted.has_unfinished()


def test_aa_rounds_compare_two_engines_on_the_same_workload(engines):
    workload = make_workload(4, 512, seed=5, min_prompt=3, max_prompt=12, min_out=2, max_out=5)
    first, second = engines
    before = [engine.stats.steps for engine in engines]
    ratios = aa_ratios(first, second, workload, turn_steps=3, rounds=2)
    assert len(ratios) == 2 and all(0 < r < 10 for r in ratios)
    taken = [engine.stats.steps - b for engine, b in zip(engines, before, strict=True)]
    assert taken[0] == taken[1] > 0  # both did the whole workload, twice, step for step
    assert not first.has_unfinished() and not second.has_unfinished()


def test_the_tenants_benchmark_measures_all_three_runs(tmp_path):
    """benchmarks/tenants.py end to end on the tiny model: a daemon subprocess, its own Redis, JSON and a chart."""
    from benchmarks.tenants import main

    report = main(["--model", "tiny", "--flood", "150", "--victim", "4", "--victim-gap", "0.05", "--out", str(tmp_path)])
    assert set(report["runs"]) == {"alone", "flood", "one queue"}
    assert all(run["count"] == 4 and 0 < run["p50"] <= run["p99"] for run in report["runs"].values())
    # In the flood's own queue the victim waits behind it; with a stream of its own it does not.
    assert report["runs"]["one queue"]["p50"] > report["runs"]["flood"]["p50"]
    assert (tmp_path / "tenants.json").exists() and (tmp_path / "tenants.png").stat().st_size > 0


def test_the_json_schema_row_constrains_every_request_for_its_whole_output(tmp_path):
    """The row that prices the masks: its schema stays open past max_tokens, so each step of each
    request is masked, and what comes out is a prefix of that schema's JSON."""
    from benchmarks.throughput import GUIDED_SCHEMA
    from tests.engine.builders import write_tiny_model

    engine = Engine(EngineConfig(model=str(write_tiny_model(tmp_path / "m", with_tokenizer=True)), device="cpu",
                                 dtype="float32", max_num_seqs=4))
    workload = make_workload(4, 512, seed=5, min_prompt=3, max_prompt=10, min_out=20, max_out=30)
    run = EngineRun(engine, workload, "json_schema", 0, guided_json=GUIDED_SCHEMA)
    sequences = [seq for queue in engine.scheduler.waiting.values() for seq in queue]
    (result,) = run_interleaved([run])
    assert len(sequences) == 4 and result.output_tokens == sum(r.max_tokens for r in workload)  # none closed early
    assert all(seq.text.startswith('[{"id": ') and seq.finish_reason == "length" for seq in sequences)
    engine.close()
