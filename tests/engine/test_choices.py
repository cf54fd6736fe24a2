"""n > 1: one prompt computed once, its KV blocks shared by the n choices, each with its own draws."""

from __future__ import annotations

import time

import pytest
import torch

from engine_daemon import Engine, EngineConfig, SamplingParams
from engine_daemon.sequence import Status
from tests.engine.builders import PeftReference, write_adapter

# 21 tokens: one full block of 16 and a partial one, which each choice gets a copy of.
PROMPT = [400, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]


def make_engine(model, **overrides) -> Engine:
    settings = dict(model=str(model), device="cpu", dtype="float32", enable_prefix_caching=False)
    return Engine(EngineConfig(**{**settings, **overrides}))


def test_greedy_choices_each_equal_the_single_answer(tiny_llama):
    """Every choice decodes from the shared blocks and its copy of the last one: any error in
    either changes its tokens."""
    engine = make_engine(tiny_llama)
    alone = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=3))[0]
    assert [choice.index for choice in out.choices] == [0, 1, 2]
    assert all(choice.token_ids == alone.token_ids for choice in out.choices)
    assert out.token_ids == alone.token_ids and out.text == alone.text
    engine.close()


def test_sampled_choices_are_the_model_distribution_of_their_own_tokens(tmp_path, tiny_llama):
    """Choices that diverge keep their own K/V: each choice's logprobs are HF's over its own tokens."""
    adapter = write_adapter(tiny_llama, tmp_path / "a", r=4)
    reference = PeftReference.from_dir(tiny_llama, {"a": adapter})
    engine = make_engine(tiny_llama)
    engine.add_adapter("a", str(adapter))
    out = engine.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True, n=4,
                                                   logprobs=True), adapters=["a"])[0]
    assert len({tuple(choice.token_ids) for choice in out.choices}) > 1  # they did diverge
    for choice in out.choices:
        with torch.no_grad(), reference._context("a"):
            logits = reference.model(input_ids=torch.tensor([PROMPT + choice.token_ids])).logits[0].float()
        want = torch.log_softmax(logits[len(PROMPT) - 1 : -1], dim=-1)
        got = torch.tensor(choice.logprobs)
        assert torch.allclose(got, want.gather(1, torch.tensor(choice.token_ids)[:, None]).squeeze(1), atol=1e-4)
    engine.close()


def test_a_seed_makes_the_n_choices_repeat_and_the_prompt_is_computed_once(tiny_llama):
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=8, temperature=1.2, seed=42, ignore_eos=True, n=3)
    engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=1.2, seed=42, ignore_eos=True))
    single_prompt_tokens = engine.stats.prompt_tokens
    first = engine.generate([PROMPT], params)[0]
    assert engine.stats.prompt_tokens == 2 * single_prompt_tokens  # the n=3 run computed its prompt once
    second = engine.generate([PROMPT], params)[0]
    runs = [[choice.token_ids for choice in out.choices] for out in (first, second)]
    assert runs[0] == runs[1]
    assert len({tuple(tokens) for tokens in runs[0]}) == 3
    engine.close()


def test_forked_choices_share_the_full_blocks_and_own_their_last(tiny_llama):
    engine = make_engine(tiny_llama)
    request = engine.add_request(PROMPT, SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, n=3))
    engine.step()  # the prefill: the choices fork
    choices = engine.choices[request]
    assert all(choice.status is Status.RUNNING for choice in choices)
    blocks = engine.kv.blocks
    shared = choices[0].block_table[0]
    assert all(choice.block_table[0] == shared for choice in choices)
    assert blocks._refs[shared] == 3
    last = [choice.block_table[1] for choice in choices]
    assert len(set(last)) == 3 and all(blocks._refs[block] == 1 for block in last)
    assert blocks.num_used == 4
    while engine.has_unfinished():
        engine.step()
    assert blocks.num_used == 0
    assert len(engine.pop_finished(request).choices) == 3
    engine.close()


def test_choices_beyond_max_num_seqs_wait_and_still_answer_the_same(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=2)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=4)
    out = engine.generate([PROMPT], params)[0]
    alone = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert [choice.token_ids for choice in out.choices] == [alone.token_ids] * 4
    assert all(choice.finish_reason == "length" for choice in out.choices)
    engine.close()


def test_each_choice_stops_on_its_own_and_the_request_ends_with_the_last(tiny_llama):
    engine = make_engine(tiny_llama)
    request = engine.add_request(PROMPT, SamplingParams(max_tokens=12, temperature=1.5, seed=8, n=3,
                                                        ignore_eos=True, stop_token_ids=list(range(0, 512, 3))))
    ended: dict[int, str] = {}
    finished = []
    deadline = time.monotonic() + 60
    while engine.has_unfinished() and time.monotonic() < deadline:
        for out in engine.step():
            assert out.index not in ended  # nothing more after a choice's end
            if out.choice_finished:
                ended[out.index] = out.finish_reason
            finished.append(out.finished)
    assert sorted(ended) == [0, 1, 2]
    assert finished.count(True) == 1 and finished[-1]
    result = engine.pop_finished(request)
    assert [choice.finish_reason for choice in result.choices] == [ended[i] for i in range(3)]
    engine.close()


def test_aborting_a_request_frees_every_choice_at_once(tiny_llama):
    engine = make_engine(tiny_llama)
    request = engine.add_request(PROMPT, SamplingParams(max_tokens=50, temperature=1.0, ignore_eos=True, n=3))
    engine.step()
    engine.step()
    assert engine.kv.blocks.num_used > 0
    assert engine.abort(request)
    assert engine.kv.blocks.num_used == 0 and not engine.has_unfinished()
    assert request not in engine.choices
    engine.close()


def test_resumed_choices_continue_after_their_own_tokens(tiny_llama):
    """A request another engine had started: each choice resumes after the tokens it delivered,
    a finished one stays finished."""
    engine = make_engine(tiny_llama)
    full = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=1))[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=3)
    request = engine.add_request(PROMPT, params, resume_choices=[
        (full.token_ids[:3], "", None), ([], "", None), (full.token_ids[:8], "", "length")])
    while engine.has_unfinished():
        engine.step()
    result = engine.pop_finished(request)
    assert [choice.token_ids for choice in result.choices] == [full.token_ids] * 3
    engine.close()


def test_n_is_bounded():
    with pytest.raises(ValueError, match="n must be in"):
        SamplingParams(n=17)
    with pytest.raises(ValueError, match="n must be in"):
        SamplingParams(n=0)
