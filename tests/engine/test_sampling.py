"""Sampling parameters, stop conditions and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from engine_daemon import Engine, EngineConfig, SamplingParams
from engine_daemon.sampling import Sampler, make_generator
from tests.engine.builders import write_tiny_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("chat-model"), with_tokenizer=True)


@pytest.fixture(scope="module")
def engine(chat_model):
    engine = Engine(EngineConfig(model=str(chat_model), device="cpu", dtype="float32"))
    yield engine
    engine.close()


PROMPT = "Ahoy matey, the sea"


def test_greedy_top_k_1_and_tiny_top_p_agree(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    top_k = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True))[0]
    top_p = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.8, top_p=1e-6, ignore_eos=True))[0]
    assert greedy.token_ids == top_k.token_ids == top_p.token_ids


def test_a_seed_makes_sampling_reproducible_inside_a_mixed_batch(engine):
    seeded = SamplingParams(max_tokens=16, temperature=1.5, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=16, temperature=1.5, ignore_eos=True)
    alone = engine.generate([PROMPT], seeded)[0].token_ids
    batch = engine.generate([PROMPT, PROMPT, "different"], [other, seeded, other])
    assert batch[1].token_ids == alone
    different_seed = SamplingParams(max_tokens=16, temperature=1.5, seed=99, ignore_eos=True)
    assert engine.generate([PROMPT], different_seed)[0].token_ids != alone


def test_sampler_follows_the_distribution_with_top_k_and_top_p():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = make_generator(0, torch.device("cpu"))

    def frequencies(params: SamplingParams) -> torch.Tensor:
        tokens = sampler.sample(logits, [params] * len(logits), [gen] * len(logits)).tokens
        return torch.bincount(tokens, minlength=4).float() / len(logits)

    plain = frequencies(SamplingParams(temperature=1.0))
    assert torch.allclose(plain, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    top_k = frequencies(SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top_k, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03)
    top_p = frequencies(SamplingParams(temperature=1.0, top_p=0.7))  # 0.5 + 0.3 reaches 0.7
    assert top_p[2:].sum() == 0 and abs(float(top_p[0]) - 0.625) < 0.03
    cold = frequencies(SamplingParams(temperature=0.25))  # p^4, renormalised
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 4
    assert torch.allclose(cold, expected / expected.sum(), atol=0.03)


def test_max_tokens_stop_token_ids_and_eos(engine):
    out = engine.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    stop_at = out.token_ids[2]
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == out.token_ids[: out.token_ids.index(stop_at) + 1]


def test_eos_ends_the_request_unless_ignored(engine, monkeypatch):
    eos = next(iter(engine.eos_token_ids))
    forward = engine.model.forward

    def eos_always_wins(*args, **kwargs):
        logits = forward(*args, **kwargs).clone()
        logits[:, eos] += 1000.0
        return logits

    monkeypatch.setattr(engine.model, "forward", eos_always_wins)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids == [eos] and out.text == ""
    ignored = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == [eos] * 8


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed(engine):
    full = engine.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].text
    assert len(full) > 8
    stop = full[5:9]  # four characters that almost surely span two or more tokens
    request_id = engine.add_request(PROMPT, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))
    streamed = ""
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.new_text
            assert stop not in streamed
    result = engine.pop_finished(request_id)
    assert result.finish_reason == "stop"
    assert result.text == streamed == full[: full.index(stop)]


def test_streamed_text_never_splits_a_character(engine):
    """Feed a multi-byte text one byte-token at a time: no delta holds half a character."""
    from engine_daemon import detokenizer
    from engine_daemon.sequence import Sequence

    byte_tokens = engine.tokenizer.backend.get_vocab()
    alphabet = _byte_level_alphabet()
    text = "naïve 日本語 🎉!"
    ids = [byte_tokens[alphabet[b]] for b in text.encode()]
    seq = Sequence("r", [1], SamplingParams())
    deltas = []
    for token in ids:
        seq.output_ids.append(token)
        detokenizer.append_token_text(seq, engine.tokenizer)
        deltas.append(detokenizer.take_new_text(seq, finished=False))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert deltas[text.encode().index("日".encode()) : text.encode().index("日".encode()) + 2] == ["", ""]


def test_resuming_inside_a_character_loses_nothing(engine):
    """Another daemon streamed the tokens up to the middle of 本: the client has "日" and gets "本…" next."""
    from engine_daemon import detokenizer
    from engine_daemon.sequence import Sequence

    vocab, alphabet = engine.tokenizer.backend.get_vocab(), _byte_level_alphabet()
    ids = [vocab[alphabet[b]] for b in "日本!".encode()]
    sent = ids[:4]  # the three bytes of 日 and the first byte of 本
    seq = Sequence("r", [1], SamplingParams(stop=["!!"]))
    detokenizer.resume(seq, sent, "日", engine.tokenizer)
    deltas = []
    for token in ids[4:]:
        seq.output_ids.append(token)
        detokenizer.append_token_text(seq, engine.tokenizer)
        deltas.append(detokenizer.take_new_text(seq, finished=False))
    deltas.append(detokenizer.take_new_text(seq, finished=True))
    assert "日" + "".join(deltas) == "日本!"


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character map that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def test_chat_uses_the_model_template(engine):
    out = engine.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert engine.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def reference_adjust(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
    """OpenAI's formulas, one row and one token at a time."""
    out = logits.clone()
    for row, (p, tokens) in enumerate(zip(params, outputs, strict=True)):
        for token in set(tokens):
            out[row, token] -= tokens.count(token) * p.frequency_penalty + p.presence_penalty
        for token, bias in p.logit_bias.items():
            out[row, token] += bias
    return out


def test_penalties_and_logit_bias_follow_openais_formulas_for_a_mixed_batch():
    from engine_daemon.sampling import adjust_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    params = [
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(),  # asks for nothing: its row is untouched
        SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0, logit_bias={3: 100.0, "7": -100}),
        SamplingParams(logit_bias={3: 0.5}),
    ]
    outputs = [[1, 1, 2, 9, 1], [1, 2], [7, 7, 3], []]
    got = adjust_logits(logits, params, outputs)
    assert torch.allclose(got, reference_adjust(logits, params, outputs), atol=1e-6)
    assert got[1].equal(logits[1]) and not got[0].equal(logits[0])


def test_logit_bias_steers_greedy_decoding_and_penalties_stop_repeats(engine):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = engine.generate([PROMPT], greedy)[0].token_ids
    # +100 makes one token win every step; -100 on the first greedy token keeps it out.
    forced = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                      logit_bias={"42": 100}, logprobs=True))[0]
    assert forced.token_ids == [42] * 6
    banned = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                      logit_bias={plain[0]: -100}))[0]
    assert plain[0] not in banned.token_ids
    # Strong penalties: greedy decoding repeats itself less (the tiny random model loops without them).
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    looping = engine.generate([PROMPT], long)[0].token_ids
    penalised = engine.generate([PROMPT], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True,
                                                         frequency_penalty=2.0, presence_penalty=2.0))[0].token_ids
    repeats = lambda tokens: len(tokens) - len(set(tokens))  # noqa: E731
    assert repeats(penalised) < repeats(looping)
    # The log-probabilities reported stay the model's own, whatever steered the choice: token 42
    # was no sure thing for the model.
    assert all(logprob < -0.5 for logprob in forced.logprobs)


def test_penalties_and_bias_are_checked():
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="logit_bias maps token ids"):
        SamplingParams(logit_bias={5: 101})
    with pytest.raises(TypeError, match="logit_bias must be"):
        SamplingParams(logit_bias={"five": 1.0})
    with pytest.raises(ValueError, match="at most 300"):
        SamplingParams(logit_bias={i: 1.0 for i in range(301)})
    wire = SamplingParams(logit_bias={5: 2.0}, frequency_penalty=0.5).to_wire()
    import json

    assert SamplingParams.from_wire(json.loads(json.dumps(wire))).logit_bias == {5: 2.0}
