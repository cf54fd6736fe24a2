"""The prefix cache: what is reused, and what never is (other tenants, other adapters, other weights)."""

from __future__ import annotations

import pytest

from engine_daemon import Engine, EngineConfig, SamplingParams
from tests.engine.builders import write_adapter

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
BLOCK = 4
PROMPT = [5, 17, 300, 42, 8, 99, 100, 3, 250, 1, 2, 77, 31]  # 13 tokens: 3 full blocks and one token


def make_engine(model_dir, **overrides) -> Engine:
    settings = dict(model=str(model_dir), device="cpu", dtype="float32", max_loras=2, max_lora_rank=8,
                    block_size=BLOCK)
    settings.update(overrides)
    return Engine(EngineConfig(**settings))


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix-adapters")
    return {name: write_adapter(tiny_llama, folder / name, r=4, seed=i) for i, name in enumerate(("a", "b"))}


def run(engine: Engine, prompt: list[int], adapter: str | None = None, tenant: str = "t1", params=GREEDY):
    return engine.generate([prompt], params, adapters=[adapter], tenants=[tenant])[0]


def test_the_same_prompt_twice_reuses_its_full_blocks_and_gives_the_same_tokens(tiny_llama, adapters):
    engine = make_engine(tiny_llama)
    engine.add_adapter("a", str(adapters["a"]))
    first, second = run(engine, PROMPT, "a"), run(engine, PROMPT, "a")
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 3 * BLOCK  # the last token is always computed, for its logits
    assert second.token_ids == first.token_ids
    # A prompt of whole blocks keeps its last block to compute: the cache never serves it all.
    whole = PROMPT[:12]
    run(engine, whole, "a")
    assert run(engine, whole, "a").num_cached_tokens == 2 * BLOCK
    engine.close()


def test_a_prompt_sharing_part_of_a_block_reuses_only_the_whole_blocks_before_it(tiny_llama):
    engine = make_engine(tiny_llama)
    run(engine, PROMPT)
    partial = PROMPT[:6] + [400, 401, 402, 403, 404]  # diverges inside the second block
    out = run(engine, partial)
    assert out.num_cached_tokens == BLOCK
    alone = make_engine(tiny_llama, enable_prefix_caching=False)
    assert out.token_ids == run(alone, partial).token_ids
    engine.close()
    alone.close()


def test_no_block_is_shared_across_tenants_adapters_or_the_base_model(tiny_llama, adapters):
    engine = make_engine(tiny_llama)
    for name, path in adapters.items():
        engine.add_adapter(name, str(path))
    run(engine, PROMPT, "a", tenant="t1")
    cached = set(engine.kv.blocks._cached.values())
    assert len(cached) == 4  # 13 prompt and 5 generated tokens computed: 4 full blocks
    for adapter, tenant in (("a", "t2"), ("b", "t1"), (None, "t1")):
        engine.add_request(PROMPT, GREEDY, request_id=f"{adapter}-{tenant}", adapter=adapter, tenant=tenant)
        engine.step()  # admitted and prefilled: its block table is set
        seq = engine.sequences[f"{adapter}-{tenant}"]
        assert seq.num_cached_tokens == 0, (adapter, tenant)
        assert not cached & set(seq.block_table), (adapter, tenant)
        while not seq.finish_reason:
            engine.step()
    assert run(engine, PROMPT, "a", tenant="t1").num_cached_tokens == 3 * BLOCK  # still there for its owner
    engine.close()


def test_an_adapter_added_again_under_its_name_finds_none_of_the_old_weights_blocks(tiny_llama, adapters):
    engine = make_engine(tiny_llama)
    engine.add_adapter("a", str(adapters["a"]))
    run(engine, PROMPT, "a")
    engine.add_adapter("a", str(adapters["b"]))  # new weights, same name
    assert run(engine, PROMPT, "a").num_cached_tokens == 0
    engine.close()


def test_the_next_turn_reuses_the_previous_turns_prompt_and_answer(tiny_llama):
    engine = make_engine(tiny_llama)
    turn1 = run(engine, PROMPT, params=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    # The next turn resends all of turn 1 (prompt and answer) and adds the user's new message.
    turn2_prompt = PROMPT + turn1.token_ids + [9, 10, 11]
    turn2 = run(engine, turn2_prompt)
    # 13 + 8 = 21 tokens of turn 1, of which the K/V of the first 20 were computed (the last
    # sampled token never was): 5 full blocks.
    assert turn2.num_cached_tokens == 5 * BLOCK
    alone = make_engine(tiny_llama, enable_prefix_caching=False)
    assert turn2.token_ids == run(alone, turn2_prompt).token_ids
    engine.close()
    alone.close()


def test_turned_off_nothing_is_cached(tiny_llama):
    engine = make_engine(tiny_llama, enable_prefix_caching=False)
    run(engine, PROMPT)
    assert run(engine, PROMPT).num_cached_tokens == 0 and engine.kv.blocks.num_cached == 0
    engine.close()


def test_idle_cached_blocks_are_reclaimed_when_blocks_run_out(tiny_llama):
    """The cache holds what no running sequence needs; a sequence that needs the room gets it."""
    engine = make_engine(tiny_llama, kv_cache_bytes=8 * 2 * 2 * BLOCK * 2 * 16 * 4)  # 8 blocks
    blocks = engine.kv.blocks
    assert blocks.num_blocks == 8
    run(engine, PROMPT)
    assert blocks.num_cached == 4 and blocks.num_free == 8  # idle cached blocks count as free
    other = [400 + i for i in range(29)]  # with its 3 generated tokens: all 8 blocks
    out = run(engine, other, params=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert out.finish_reason == "length" and blocks.num_free == 8
    assert run(engine, PROMPT).num_cached_tokens == 0  # PROMPT's blocks were taken
    engine.close()
