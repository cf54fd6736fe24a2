"""Continuous batching: preemption, chunked prefill, fairness, the max_loras bound, abort, KV accounting."""

from __future__ import annotations

import random

import pytest

from engine_daemon import Engine, EngineConfig, SamplingParams
from tests.engine.builders import write_adapter

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def make_engine(model_dir, **overrides) -> Engine:
    settings = dict(model=str(model_dir), device="cpu", dtype="float32", max_loras=4, max_lora_rank=16)
    settings.update(overrides)
    return Engine(EngineConfig(**settings))


def prompts(count: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama):
    """Each prompt run alone, uninterrupted, with plenty of KV cache."""
    engine = make_engine(tiny_llama, max_num_seqs=1)
    tokens = [out.token_ids for out in engine.generate(prompts(12), GREEDY)]
    engine.close()
    return tokens


def test_preemption_by_recompute_gives_the_same_tokens(tiny_llama, reference_tokens):
    # 10 blocks of 16 tokens cannot hold 12 sequences of up to 63 tokens: sequences get preempted.
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head dim, fp32
    engine = make_engine(tiny_llama, kv_cache_bytes=10 * block_bytes, max_num_seqs=12)
    outs = engine.generate(prompts(12), GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference_tokens
    assert engine.kv.blocks.num_free == engine.kv.blocks.num_blocks
    engine.close()


def test_chunked_prefill_gives_the_same_tokens(tiny_llama, reference_tokens):
    engine = make_engine(tiny_llama, max_num_batched_tokens=7, max_num_seqs=4)
    outs = engine.generate(prompts(12), GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    # Every step stayed within the token budget while prefill chunks and decodes were mixed.
    assert max(r.num_tokens for r in engine.stats.recent) <= 7
    assert any(r.num_seqs > 1 and r.num_tokens > r.num_sampled for r in engine.stats.recent)
    engine.close()


def test_a_single_request_is_not_starved_by_a_tenant_with_500_queued(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=16, max_num_batched_tokens=256)
    long_run = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(500, seed=1, high=12)):
        engine.add_request(prompt, long_run, request_id=f"bulk-{i}", tenant="bulk")
    for _ in range(5):  # the bulk tenant fills every sequence slot
        engine.step()
    assert len(engine.scheduler.running) == 16
    engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=4, temperature=0.0), request_id="single", tenant="solo")
    steps_to_first_token = next(
        (step for step in range(1, 4) if any(out.request_id == "single" for out in engine.step())), None
    )
    assert steps_to_first_token is not None and steps_to_first_token <= 2
    engine.close()


def test_fair_share_splits_sequences_between_busy_tenants(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=8, max_num_batched_tokens=512)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for tenant in ("a", "b"):
        for i, prompt in enumerate(prompts(40, seed=2, high=10)):
            engine.add_request(prompt, params, request_id=f"{tenant}-{i}", tenant=tenant)
    for _ in range(10):
        engine.step()
    per_tenant = {t: sum(s.tenant == t for s in engine.scheduler.running) for t in ("a", "b")}
    assert per_tenant == {"a": 4, "b": 4}
    engine.close()


def test_weighted_fair_share_follows_tenant_weights(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=8, max_num_batched_tokens=512)
    engine.set_tenant_weight("gold", 3.0)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for tenant in ("bronze", "gold"):  # bronze queues first and would take every slot
        for i, prompt in enumerate(prompts(40, seed=2, high=10)):
            engine.add_request(prompt, params, request_id=f"{tenant}-{i}", tenant=tenant)
    for _ in range(10):
        engine.step()
    per_tenant = {t: sum(s.tenant == t for s in engine.scheduler.running) for t in ("gold", "bronze")}
    assert per_tenant == {"gold": 6, "bronze": 2}
    engine.close()


def test_never_more_than_max_loras_adapters_in_a_step(tmp_path, tiny_llama):
    engine = make_engine(tiny_llama, max_loras=2, max_num_seqs=16)
    names = [f"a{i}" for i in range(5)]
    for i, name in enumerate(names):
        engine.add_adapter(name, str(write_adapter(tiny_llama, tmp_path / name, r=4, seed=i)))
    batch = prompts(15, seed=3)
    adapters = [names[i % 5] for i in range(15)]
    outs = engine.generate(batch, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), adapters=adapters)
    assert max(r.num_adapters for r in engine.stats.recent) == 2
    # Same tokens as each request served on its own.
    alone = make_engine(tiny_llama, max_loras=1, max_num_seqs=1)
    for name in names:
        alone.add_adapter(name, str(tmp_path / name))
    for out, prompt, adapter in zip(outs, batch, adapters, strict=True):
        single = alone.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), [adapter])
        assert out.token_ids == single[0].token_ids
    engine.close()
    alone.close()


def test_abort_frees_blocks_and_adapter_at_once(tmp_path, tiny_llama):
    engine = make_engine(tiny_llama)
    engine.add_adapter("a", str(write_adapter(tiny_llama, tmp_path / "a", r=4)))
    engine.prefetch_adapter("a")
    engine.wait_for_adapters()
    ids = [engine.add_request(p, GREEDY, adapter="a" if i % 2 else None) for i, p in enumerate(prompts(6))]
    for _ in range(3):
        engine.step()
    assert engine.kv.blocks.num_used > 0
    assert engine.residency.records["a"].in_use == 3
    for request_id in ids:
        assert engine.abort(request_id)
    assert engine.kv.blocks.num_free == engine.kv.blocks.num_blocks
    assert engine.residency.records["a"].in_use == 0
    assert not engine.has_unfinished()
    assert not engine.abort(ids[0])  # already gone
    engine.close()


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-cache"])
def test_kv_block_accounting_never_leaks_under_random_churn(tiny_llama, caching):
    """Random arrivals (some with n choices), aborts and preemptions; half the prompts share a 20-token
    system prompt and some repeat a finished one, so with the cache on blocks are shared and reclaimed. After every
    step each block's owners are exactly the running sequences that hold it, the cache's index
    agrees with itself, and at the end every block is free (idle cached blocks count as free)."""
    rng = random.Random(7)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    engine = make_engine(tiny_llama, kv_cache_bytes=24 * block_bytes, max_num_seqs=6, max_num_batched_tokens=40,
                         enable_prefix_caching=caching)
    blocks = engine.kv.blocks
    system = prompts(1, seed=99, low=20, high=21)[0]
    sent: list[list[int]] = []
    live: list[str] = []
    steps_with_choices = 0  # steps running two choices of one request
    for step in range(150):
        if rng.random() < 0.4:
            prompt = prompts(1, seed=step)[0]
            if rng.random() < 0.5:
                prompt = system + prompt
            elif sent and rng.random() < 0.3:
                prompt = rng.choice(sent)
            sent.append(prompt)
            # Some ask for several choices: they fork from one prompt's blocks, or wait when there is no room.
            params = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.0, ignore_eos=True,
                                    n=rng.choice([1, 1, 2, 3]))
            live.append(engine.add_request(prompt, params))
        if live and rng.random() < 0.1:
            engine.abort(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished:
                engine.pop_finished(out.request_id)
                live.remove(out.request_id)
        running_ids = [seq.request_id for seq in engine.scheduler.running]
        steps_with_choices += len(set(running_ids)) < len(running_ids)
        owners = [0] * blocks.num_blocks
        for seq in engine.scheduler.running:
            for block in seq.block_table:
                owners[block] += 1
        assert blocks._refs == owners, f"step {step}: owners and reference counts differ"
        assert blocks.num_used == sum(1 for n in owners if n), f"step {step}"
        assert all(blocks._hash_of[block] == digest for digest, block in blocks._cached.items())
        assert all(owners[block] == 0 for block in blocks._idle)
    assert steps_with_choices > 10
    if caching:
        assert engine.scheduler.prefix_tokens and any(c for _, c in engine.scheduler.prefix_tokens.values())
    else:
        assert blocks.num_cached == 0
    for request_id in live:
        engine.abort(request_id)
    assert blocks.num_free == blocks.num_blocks
    engine.close()
