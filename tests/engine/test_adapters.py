"""Adapter residency: LRU across the device pool and host RAM, pinning, in-use safety, background loads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine_daemon import Engine, EngineConfig, SamplingParams
from engine_daemon import adapters as adapters_module
from tests.engine.builders import pool_bytes, write_adapter

ONE = SamplingParams(max_tokens=1, temperature=0.0)
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(tiny_llama, root / name, r=4, seed=i) for i, name in enumerate("abcd")}


def make_engine(tiny_llama, adapter_dirs, room: int = 2, **overrides) -> Engine:
    """An engine whose device pool holds `room` of the rank-4 adapters, as many in one step."""
    settings = dict(model=str(tiny_llama), device="cpu", dtype="float32", max_loras=room, max_cpu_loras=8,
                    lora_pool_bytes=pool_bytes(tiny_llama, [4] * room))
    settings.update(overrides)
    engine = Engine(EngineConfig(**settings))
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, str(path))
    return engine


def tiers(engine: Engine) -> dict[str, str]:
    return {row["name"]: row["tier"] for row in engine.residency.snapshot()}


def serve(engine: Engine, *names: str) -> None:
    for name in names:
        out = engine.generate([PROMPT], ONE, adapters=[name])[0]
        assert out.error is None


def test_least_recently_used_slot_is_evicted_to_host(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs)
    assert set(tiers(engine).values()) == {"disk"}
    serve(engine, "a", "b", "a", "c")  # c needs rows: b was used longest ago
    assert tiers(engine) == {"a": "gpu", "b": "host", "c": "gpu", "d": "disk"}
    slots = {row["name"]: row["slot"] for row in engine.residency.snapshot()}
    assert {slots["a"], slots["c"]} == {0, 4}  # each adapter's first row; rank 4 takes 4
    engine.close()


def test_host_tier_keeps_max_cpu_loras(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=1, max_cpu_loras=2)
    serve(engine, "a", "b", "c")
    rows = {row["name"]: row for row in engine.residency.snapshot()}
    assert [n for n, r in rows.items() if r["in_host"]] == ["b", "c"]  # a fell out of host RAM first
    assert rows["a"]["tier"] == "disk" and rows["c"]["tier"] == "gpu"
    engine.close()


def test_pinned_adapter_is_never_evicted(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs)
    engine.pin_adapter("a")
    serve(engine, "a", "b", "c", "d", "b")
    assert tiers(engine)["a"] == "gpu"
    engine.close()


def test_hits_and_loads_are_counted(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=1)
    serve(engine, "a", "a", "b", "a")
    row = {r["name"]: r for r in engine.residency.snapshot()}["a"]
    assert row["requests"] == 3
    assert row["disk_loads"] == 1  # read from disk once
    assert row["host_hits"] == 1  # came back from host RAM after b took the slot
    assert row["gpu_hits"] == 1  # second request found it in its slot
    assert row["slot_loads"] == 2 and row["evictions"] == 1
    assert row["mean_load_seconds"] > 0
    engine.close()


def test_adapter_of_a_running_sequence_is_never_evicted(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs, room=1)
    engine.prefetch_adapter("a")
    engine.wait_for_adapters()
    long_run = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPT, long_run, request_id="long", adapter="a")
    engine.add_request(PROMPT, ONE, request_id="other", adapter="b")
    finished = []
    for _ in range(40):
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
        if "long" not in finished:
            assert tiers(engine)["a"] == "gpu"
            assert tiers(engine)["b"] != "gpu"  # no rows could be taken from a running sequence
    assert finished[0] == "long"
    engine.wait_for_adapters()
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["long", "other"]
    engine.close()


def test_a_slow_adapter_load_does_not_stall_other_requests(tiny_llama, adapter_dirs, monkeypatch):
    release = threading.Event()
    real_read = adapters_module.read_adapter_weights

    def slow_read(path, manifest, dtype):
        if path.name == "b":
            assert release.wait(timeout=30)
        return real_read(path, manifest, dtype)

    monkeypatch.setattr(adapters_module, "read_adapter_weights", slow_read)
    engine = make_engine(tiny_llama, adapter_dirs)
    many = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPT, many, request_id="slow", adapter="b")
    engine.add_request(PROMPT, many, request_id="base")
    done = set()
    for _ in range(10):
        done |= {o.request_id for o in engine.step() if o.finished}
    assert "base" in done and "slow" not in done
    assert tiers(engine)["b"] == "loading"
    release.set()
    engine.wait_for_adapters()
    while engine.has_unfinished():
        done |= {o.request_id for o in engine.step() if o.finished}
    assert engine.pop_finished("slow").token_ids and len(done) == 2
    engine.close()


def test_removed_adapter_cannot_be_requested(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs)
    serve(engine, "a")
    engine.remove_adapter("a")
    out = engine.generate([PROMPT], ONE, adapters=["a"])[0]
    assert out.finish_reason == "error" and "unknown adapter 'a'" in out.error
    engine.close()


def test_snapshot_rates_cover_a_recent_window_and_time_the_lora_share(tiny_llama, adapter_dirs):
    engine = make_engine(tiny_llama, adapter_dirs)
    engine.generate([PROMPT] * 4, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                    adapters=["a", "b", None, None])
    busy = engine.snapshot(window_seconds=60)
    assert busy.tokens_per_second == pytest.approx(24 / 60)
    assert 0 < busy.lora_share < 1  # timed on every CPU step that served an adapter
    time.sleep(0.2)
    idle = engine.snapshot(window_seconds=0.1)
    assert idle.tokens_per_second == 0 and idle.step_seconds == 0 and idle.lora_share is None
    engine.close()


def test_slot_pool_layout_fuses_shrinks_and_keeps_low_ranks_contiguous(tiny_llama, adapter_dirs):
    """q/k/v (and gate/up) A rows of a slot interleave into one [rank * parts, in] matrix, so one
    shrink serves them all; B is rank-major so a low-rank slot reads one contiguous block."""
    from engine_daemon.adapters import read_adapter_weights
    from engine_daemon.lora import GATE_UP, QKV

    engine = make_engine(tiny_llama, adapter_dirs)
    serve(engine, "b")
    record = engine.residency.get("b")
    pool, slot, rank = engine.residency.pool, record.slot, record.manifest.rank
    host = read_adapter_weights(record.path, record.manifest, engine.dtype)
    for parts in (QKV, GATE_UP):
        for layer in range(engine.model_config.num_layers):
            fused = pool.shrink_weights(parts, layer)[slot, : rank * len(parts)]
            assert fused.is_contiguous()
            for i, part in enumerate(parts):
                assert fused[i :: len(parts)].equal(host[(part, layer)][0])
                assert pool.a[part][layer][slot, :rank].equal(host[(part, layer)][0])
    for module, per_layer in pool.b.items():
        b = per_layer[0][slot, :, :rank]
        assert b.t().is_contiguous() and b.equal(host[(module, 0)][1])
    engine.close()


def test_steps_with_the_same_targets_share_one_group_table(tiny_llama, adapter_dirs):
    """LoraBatch finds a projection group with one dict read: the engine keeps a table per target
    set (LRU-bounded), whose entries name the adapted parts only, or None where none is."""
    from engine_daemon import lora

    engine = make_engine(tiny_llama, adapter_dirs)
    groups = engine.lora_groups
    targets = frozenset({("q_proj", 0), ("v_proj", 0), ("down_proj", 1)})
    table = groups.table(targets)
    assert groups.table(frozenset(targets)) is table
    qkv = groups.fill(table, targets, lora.QKV, 0)
    assert table[lora.QKV, 0] is qkv and qkv.parts[1] is None and None not in (qkv.parts[0], qkv.parts[2])
    assert groups.fill(table, targets, ("o_proj",), 0) is None and table[("o_proj",), 0] is None
    for layer in range(lora._TARGET_TABLES):  # as many other target sets: the first goes
        groups.table(frozenset({("o_proj", 1000 + layer)}))
    assert groups.table(targets) is not table and groups.table(targets) == {}
    engine.close()


_THREAD_PROBE = """
import os, sys, threading, torch
from engine_daemon.adapters import run_torch_inline_on_this_thread
torch.set_num_threads(2)
torch.ones(1 << 20).add_(1)  # the stepping thread's OpenMP team exists
before = len(os.listdir("/proc/self/task"))
seen = []
def load():
    if sys.argv[1] == "inline":
        run_torch_inline_on_this_thread()
    torch.ones(1 << 22).mul_(2)  # large enough for ATen to split it across threads
    seen.append(len(os.listdir("/proc/self/task")))
thread = threading.Thread(target=load)
thread.start()
thread.join()
print(seen[0] - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc on a machine with 2+ CPUs")
def test_the_loader_thread_runs_torch_without_a_second_openmp_team():
    """A background thread's torch ops must not start an OpenMP team of their own: libgomp would
    then throttle its spin-wait and every parallel region of the engine step pays a wake-up."""
    def extra_threads(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _THREAD_PROBE, mode], capture_output=True, text=True,
                             timeout=120, check=True, cwd=Path(__file__).resolve().parents[2])
        return int(run.stdout.strip())

    assert extra_threads("team") == 2  # control: the thread itself plus its own OpenMP worker
    assert extra_threads("inline") == 1  # the thread alone
