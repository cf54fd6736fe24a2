"""Parsing the body of /v1/chat/completions and /v1/completions: every refusal names its parameter."""

import json

import pytest

from engine_daemon.protocol import SamplingParams
from portal.inference.errors import InferenceError
from portal.inference.params import CHAT, COMPLETION, body_parse, completion_params_parse

CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(kind=CHAT, **fields):
    base = CHAT_BODY if kind == CHAT else {"model": "m", "prompt": "hi"}
    return completion_params_parse({**base, **fields}, kind=kind)


def refused(kind=CHAT, **fields) -> InferenceError:
    with pytest.raises(InferenceError) as caught:
        parse(kind, **fields)
    assert caught.value.status == 400
    return caught.value


def test_defaults_and_sampling(settings):
    params = parse()
    assert (params.max_tokens, params.temperature, params.top_p, params.stream) == (
        settings.LORAFLEET_DEFAULT_MAX_TOKENS, 1.0, 1.0, False)
    params = parse(max_tokens=5, temperature=0, top_p=0.5, seed=7, stop="\n", user="u1", n=1,
                   stream=True, stream_options={"include_usage": True})
    assert params.sampling() == {"max_tokens": 5, "temperature": 0.0, "top_p": 0.5, "top_k": 0, "seed": 7,
                                 "stop": ["\n"], "stop_token_ids": [], "ignore_eos": False, "logprobs": False,
                                 "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}}
    assert params.include_usage and params.user == "u1"
    assert parse(max_completion_tokens=9).max_tokens == 9
    assert parse(max_completion_tokens=9, max_tokens=9).max_tokens == 9


def test_messages_are_normalized_to_text():
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": "ok"},
    ]
    assert parse(messages=messages).messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ok"},
    ]
    assert parse(COMPLETION, prompt=["only one"]).prompt == "only one"


def test_null_and_neutral_values_of_unsupported_parameters_are_accepted():
    params = parse(presence_penalty=0, frequency_penalty=0.0, logprobs=False, tools=None, logit_bias=None)
    assert params.model == "m"


def test_penalties_and_logit_bias_reach_the_engines_sampling_parameters():
    params = parse(presence_penalty=-0.5, frequency_penalty=2, logit_bias={"42": 100, "7": -3.5})
    sampling = SamplingParams.from_wire(json.loads(json.dumps(params.sampling())))  # as the wire carries it
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-0.5, 2.0)
    assert sampling.logit_bias == {42: 100.0, 7: -3.5}
    assert parse().sampling()["logit_bias"] == {} and not SamplingParams.from_wire(parse().sampling()).adjusts_logits


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"frequency_penalty": "high"}, "frequency_penalty", "invalid_value"),
    ({"logit_bias": [1, 2]}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"-1": 5}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"five": 5}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": True}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"model": ""}, "model", "missing_required_parameter"),
    ({"messages": None}, "messages", "missing_required_parameter"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported_parameter"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content",
     "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": 1.5}, "max_tokens", "invalid_value"),
    ({"max_tokens": True}, "max_tokens", "invalid_value"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "invalid_value"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),
    ({"temperature": "hot"}, "temperature", "invalid_value"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"seed": -1}, "seed", "invalid_value"),
    ({"stop": ["a", ""]}, "stop", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stream": "yes"}, "stream", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"stream": True, "stream_options": {"other": 1}}, "stream_options.other", "unsupported_parameter"),
    ({"user": 5}, "user", "invalid_value"),
])
def test_chat_refusals_name_the_parameter(fields, param, code):
    error = refused(**fields)
    assert (error.param, error.code) == (param, code)
    assert param.split("[")[0].split(".")[0] in error.message


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"prompt": None}, "prompt", "missing_required_parameter"),
    ({"prompt": [1, 2, 3]}, "prompt", "unsupported_parameter"),
    ({"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    ({"prompt": 5}, "prompt", "invalid_value"),
    ({"echo": True}, "echo", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "unsupported_parameter"),
    ({"max_completion_tokens": 5}, "max_completion_tokens", "unsupported_parameter"),
])
def test_completion_refusals_name_the_parameter(fields, param, code):
    error = refused(COMPLETION, **fields)
    assert (error.param, error.code) == (param, code)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b"\xff"])
def test_the_body_must_be_a_json_object(raw):
    with pytest.raises(InferenceError) as caught:
        body_parse(raw)
    assert caught.value.code == "invalid_json" and caught.value.status == 400


def test_prompt_estimate_counts_about_four_characters_a_token():
    assert parse(COMPLETION, prompt="x" * 40).prompt_token_estimate() == 10
    assert parse(messages=[{"role": "user", "content": "x" * 40}]).prompt_token_estimate() == 14


@pytest.mark.parametrize("role", [[], {"a": 1}, ["user"]])
def test_a_role_that_is_not_a_string_is_refused_not_a_crash(role):
    error = refused(messages=[{"role": role, "content": "x"}])
    assert (error.param, error.code) == ("messages[0].role", "unsupported_parameter")


@pytest.mark.parametrize("raw", [b'{"model": "m", "prompt": "a\\ud800"}', b'{"\\udfff": 1}', b'{"stop": ["\xed\xa0\x80"]}'])
def test_half_a_surrogate_pair_is_not_text(raw):
    with pytest.raises(InferenceError) as caught:
        body_parse(raw)
    assert caught.value.code == "invalid_json" and "surrogate" in caught.value.message
    assert body_parse(b'{"prompt": "\\ud83d\\udca5"}') == {"prompt": "\U0001f4a5"}  # a whole pair is a character


@pytest.mark.parametrize("raw", [b"[" * 50_000, b'{"a": ' * 50_000])
def test_a_body_nested_too_deeply_is_refused(raw):
    with pytest.raises(InferenceError) as caught:
        body_parse(raw)
    assert caught.value.code == "invalid_json" and "too deeply" in caught.value.message


def test_a_model_name_with_a_nul_byte_is_refused_before_any_lookup():
    with pytest.raises(InferenceError) as caught:
        parse(model="bot\x00")
    assert (caught.value.code, caught.value.param) == ("invalid_value", "model")
