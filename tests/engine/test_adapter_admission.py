"""Adapter-aware admission: resident adapters first, a bound on passing a cold one, drains that let
it in, fair share between tenants, prefetching the queue's adapters, max_loras per step, and a
pool that holds many small adapters."""

from __future__ import annotations

import time

import pytest

from engine_daemon import Engine, EngineConfig, SamplingParams
from tests.engine.builders import pool_bytes, write_adapter
from tests.engine.test_adapters import make_engine  # device room for `room` rank-4 adapters

SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("admission-adapters")
    return {name: write_adapter(tiny_llama, root / name, r=4, seed=i) for i, name in enumerate("abcdef")}


def warm(engine: Engine, *names: str) -> None:
    for name in names:
        engine.prefetch_adapter(name)
    engine.wait_for_adapters()
    assert all(engine.residency.ready(name) for name in names)


def run(engine: Engine, seconds: float = 120.0) -> list[str]:
    """Step to the end; the request ids in the order they were first admitted. (A time limit, not
    a step limit: an engine waiting for an adapter load steps idle, thousands of steps a second.)"""
    deadline = time.monotonic() + seconds
    while engine.has_unfinished() and time.monotonic() < deadline:
        engine.step()
        if not engine.scheduler.running and engine.residency.busy:
            time.sleep(0.001)  # only loads in flight: let the loader thread have the CPU
    assert not engine.has_unfinished()
    order = []
    for request_id, _tenant in engine.scheduler.admitted:
        if request_id not in order:
            order.append(request_id)
    return order


def hot_stream(engine: Engine, count: int, tenant: str = "t", names: str = "ab") -> None:
    for i in range(count):
        engine.add_request(PROMPT, SHORT, request_id=f"hot-{i}", adapter=names[i % len(names)], tenant=tenant)


@pytest.mark.parametrize("passes", [3, 1000])
def test_a_cold_adapter_is_passed_over_a_bounded_number_of_times(tiny_llama, adapter_dirs, passes):
    """Resident adapters go first, but a request for a cold one waits for at most `passes` later
    requests of its tenant before its load starts (the rows it needs then drain)."""
    engine = make_engine(tiny_llama, adapter_dirs, room=2, max_num_seqs=1)
    engine.scheduler.max_adapter_passes = passes
    warm(engine, "a", "b")
    engine.add_request(PROMPT, SHORT, request_id="cold", adapter="c", tenant="t")
    hot_stream(engine, 12)
    order = run(engine)
    cold = engine.sequences["cold"]
    assert cold.error is None and cold.finish_reason == "length"
    if passes == 1000:
        # Never forced in: it waited until loading c evicted nothing a queued request needed,
        # near the end of the hot stream.
        assert cold.adapter_passes >= 10 and order.index("cold") >= 10
    else:
        # Passed 3 times, then its load started; a hot request or two may run while c loads.
        assert cold.adapter_passes == passes
        assert order.index("cold") <= passes + 3
        assert engine.scheduler.adapter_waits  # its wait was measured
    engine.close()


def test_a_cold_adapter_loads_at_once_where_that_evicts_nothing_the_queue_needs(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=3, max_num_seqs=1)
    warm(engine, "a", "b", "d")  # d: resident, but no request wants it
    engine.add_request(PROMPT, SHORT, request_id="cold", adapter="c", tenant="t")
    hot_stream(engine, 12)
    order = run(engine)
    assert engine.sequences["cold"].adapter_passes <= 1 and order.index("cold") <= 2
    assert engine.residency.get("d").stats.evictions == 1 and engine.residency.ready("a")
    engine.close()


def test_a_cold_adapter_gets_in_though_running_requests_hold_every_row(tiny_llama, adapter_dirs):
    """Room for one adapter, a stream of requests on it: the cold request's adapter drains it."""
    engine = make_engine(tiny_llama, adapter_dirs, room=1, max_loras=2, max_num_seqs=4)
    engine.scheduler.max_adapter_passes = 2
    warm(engine, "a")
    hot_stream(engine, 4, names="a")
    engine.step()  # the stream holds a's rows
    engine.add_request(PROMPT, SHORT, request_id="cold", adapter="c", tenant="t")
    hot_stream_more = [f"more-{i}" for i in range(12)]
    for request_id in hot_stream_more:
        engine.add_request(PROMPT, SHORT, request_id=request_id, adapter="a", tenant="t")
    order = run(engine)
    assert engine.sequences["cold"].error is None
    assert order.index("cold") < order.index("more-11")  # not left for last
    assert engine.sequences["cold"].adapter_passes <= 2
    assert not engine.scheduler.draining  # the drain ended once c was in
    engine.close()


def test_fair_share_lets_another_tenants_cold_adapter_in_ahead_of_a_hot_flood(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=2, max_num_seqs=2)
    warm(engine, "a", "b")
    hot_stream(engine, 30, tenant="flood")
    engine.step()
    engine.add_request(PROMPT, SHORT, request_id="other", adapter="c", tenant="quiet")
    order = run(engine)
    assert engine.sequences["other"].error is None
    assert order.index("other") < 10  # within a few admissions of arriving, not after the flood's 30
    engine.close()


def test_the_step_never_holds_more_than_max_loras_adapters_though_the_pool_holds_more(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=6, max_loras=2, max_num_seqs=8)
    warm(engine, *"abcdef")
    for i in range(24):
        engine.add_request(PROMPT, SHORT, request_id=f"r{i}", adapter="abcdef"[i % 6], tenant=f"t{i % 3}")
    run(engine)
    assert engine.stats.max_adapters_in_step == 2
    assert all(engine.sequences[f"r{i}"].error is None for i in range(24))
    engine.close()


def test_queued_requests_have_their_adapters_prefetched_while_the_batch_runs(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=4, max_loras=4, max_num_seqs=1)
    warm(engine, "a")
    long_run = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPT, long_run, request_id="long", adapter="a")
    for name in "cd":
        engine.add_request(PROMPT, SHORT, request_id=f"next-{name}", adapter=name)
    for _ in range(20):
        engine.step()
    assert engine.sequences["long"].status.value == "running"  # the queue has not moved yet
    engine.wait_for_adapters()
    assert engine.residency.ready("c") and engine.residency.ready("d")
    run(engine)
    # Their adapters were on the device long before their turn: each waited for its load only.
    long = engine.sequences["long"]
    waits = engine.scheduler.adapter_waits
    assert len(waits) == 2 and max(waits) < (long.finish_time - long.arrival) / 2
    engine.close()


def test_prefetching_never_evicts_an_adapter_a_queued_request_needs(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=2, max_loras=2, max_num_seqs=1)
    warm(engine, "a", "b")
    long_run = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPT, long_run, request_id="long", adapter="a")
    engine.add_request(PROMPT, SHORT, request_id="next-b", adapter="b")
    engine.add_request(PROMPT, SHORT, request_id="next-c", adapter="c")
    for _ in range(10):
        engine.step()
        assert engine.residency.ready("b")  # c's prefetch may not take b's rows
    engine.wait_for_adapters()
    assert engine.residency.get("c").host is not None  # c came as far as host RAM
    run(engine)
    engine.close()


def test_a_budget_for_16_small_adapters_keeps_all_16_on_the_device(tmp_path, tiny_llama):
    """1.1x what 16 rank-8 adapters weigh: all 16 stay resident, where the slot pool this replaced
    (16 slots of max_lora_rank 64) would have needed about 8x the memory."""
    budget = int(1.1 * pool_bytes(tiny_llama, [8] * 16))
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", max_loras=4,
                                 max_cpu_loras=16, max_lora_rank=64, lora_pool_bytes=budget))
    names = [f"small{i}" for i in range(16)]
    for i, name in enumerate(names):
        engine.add_adapter(name, str(write_adapter(tiny_llama, tmp_path / name, r=8, seed=i)))
    for _round in range(2):
        outs = engine.generate([PROMPT] * 16, SHORT, adapters=names)
        assert all(out.error is None for out in outs)
    snap = engine.snapshot()
    assert {row["name"]: row["tier"] for row in snap.adapters} == dict.fromkeys(names, "gpu")
    assert sum(row["evictions"] for row in snap.adapters) == 0
    assert sum(row["slot_loads"] for row in snap.adapters) == 16  # each loaded once, in the first round
    assert engine.memory_breakdown()["adapter_pool"] <= budget
    assert 16 * 64 * engine.residency.pool.row_bytes > 6 * budget
    engine.close()


def test_the_default_pool_holds_max_loras_adapters_of_max_lora_rank(tiny_llama):
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32", max_loras=3, max_lora_rank=16))
    assert engine.residency.pool.capacity == 3 * 16
    assert engine.memory_breakdown()["adapter_pool"] == pool_bytes(tiny_llama, [16] * 3, max_lora_rank=16)
    engine.close()


def test_a_stream_on_one_adapter_cannot_keep_another_out_of_a_full_step(tiny_llama, adapter_dirs):
    """max_loras=1 and a stream on a: after its passes, b claims the next place and a drains."""
    engine = make_engine(tiny_llama, adapter_dirs, room=4, max_loras=1, max_num_seqs=4)
    engine.scheduler.max_adapter_passes = 2
    warm(engine, "a", "b")
    hot_stream(engine, 4, names="a")
    engine.step()
    engine.add_request(PROMPT, SHORT, request_id="other", adapter="b", tenant="t")
    for i in range(12):
        engine.add_request(PROMPT, SHORT, request_id=f"more-{i}", adapter="a", tenant="t")
    order = run(engine)
    assert order.index("other") < order.index("more-11") and engine.sequences["other"].adapter_passes <= 2
    assert engine.stats.max_adapters_in_step == 1 and not engine.scheduler.draining
    engine.close()


def test_pinned_adapters_that_leave_no_room_fail_the_request_with_the_reason(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=2)
    for name in "ab":
        engine.pin_adapter(name)
    engine.wait_for_adapters()
    out = engine.generate([PROMPT], SHORT, adapters=["c"])[0]
    assert out.finish_reason == "error" and "pinned adapters leave no such run free" in out.error
    engine.close()


def test_an_adapter_of_more_rows_than_the_pool_is_refused_when_added(tmp_path, tiny_llama, adapter_dirs):
    from engine_daemon.peft_format import AdapterError

    engine = make_engine(tiny_llama, {}, room=1)  # 4 rows
    with pytest.raises(AdapterError, match="rank 8, more rows than the device's adapter pool holds"):
        engine.add_adapter("big", str(write_adapter(tiny_llama, tmp_path / "big", r=8)))
    engine.close()


def test_a_host_read_of_an_old_registration_never_lands_on_the_new_one(tiny_llama, adapter_dirs, monkeypatch):
    """a is being read into host RAM when it is added again with other weights and asked for: the
    old read must neither mark the new one ready nor become its host copy."""
    import threading

    from engine_daemon import adapters as adapters_module

    release = threading.Event()
    real_read = adapters_module.read_adapter_weights

    def slow_first_read(path, manifest, dtype):
        if path == adapter_dirs["a"]:
            assert release.wait(timeout=30)
        return real_read(path, manifest, dtype)

    monkeypatch.setattr(adapters_module, "read_adapter_weights", slow_first_read)
    engine = make_engine(tiny_llama, adapter_dirs, room=2)
    engine.prefetch_adapter("a", to_device=False)
    engine.add_adapter("a", str(adapter_dirs["b"]))  # the same name, b's weights
    assert engine.residency.acquire("a") is None and engine.residency.loading("a")
    release.set()
    engine.wait_for_adapters()
    record = engine.residency.get("a")
    want = real_read(adapter_dirs["b"], record.manifest, engine.dtype)
    pool, start = engine.residency.pool, record.slot
    for (module, layer), (a, b) in want.items():
        rank = a.shape[0]
        assert pool.a[module][layer][start, :rank].equal(a) and pool.b[module][layer][start, :, :rank].equal(b)
        assert record.host[(module, layer)][0].equal(a)
    # An adapter on the device is not read into host RAM again (it would stop looking ready).
    record.host = None
    engine.residency.prefetch_to_host("a")
    assert engine.residency.ready("a") and not engine.residency.loading("a")
    engine.close()
