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
                                 "top_logprobs": 0, "n": 1, "guided_json": None,
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
    params = parse(presence_penalty=0, frequency_penalty=0.0, logprobs=False, tools=None, logit_bias=None,
                   response_format={"type": "text"}, tool_choice=None, top_logprobs=0)
    assert params.model == "m" and params.sampling() == parse().sampling()
    assert parse(COMPLETION, echo=False, logprobs=False).sampling() == parse(COMPLETION).sampling()


def test_penalties_and_logit_bias_reach_the_engines_sampling_parameters():
    params = parse(presence_penalty=-0.5, frequency_penalty=2, logit_bias={"42": 100, "7": -3.5})
    sampling = SamplingParams.from_wire(json.loads(json.dumps(params.sampling())))  # as the wire carries it
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (-0.5, 2.0)
    assert sampling.logit_bias == {42: 100.0, 7: -3.5}
    assert parse().sampling()["logit_bias"] == {} and not SamplingParams.from_wire(parse().sampling()).adjusts_logits


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"n": 17}, "n", "invalid_value"),
    ({"n": 0}, "n", "invalid_value"),
    ({"n": 1.0}, "n", "invalid_value"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"frequency_penalty": "high"}, "frequency_penalty", "invalid_value"),
    ({"logit_bias": [1, 2]}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"-1": 5}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"five": 5}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"5": True}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
    ({"model": ""}, "model", "missing_required_parameter"),
    ({"messages": None}, "messages", "missing_required_parameter"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "unsupported_parameter"),
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


# ---- logprobs, n, response_format, tools ---------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALLED = [{"role": "user", "content": "weather?"},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]


def test_logprobs_n_and_a_schema_reach_the_engines_sampling_parameters():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = parse(logprobs=True, top_logprobs=20, n=16, response_format={
        "type": "json_schema", "json_schema": {"name": "A-1_b", "schema": schema, "strict": True, "description": "d"}})
    sampling = SamplingParams.from_wire(json.loads(json.dumps(params.sampling())))
    assert (sampling.logprobs, sampling.top_logprobs, sampling.n, sampling.guided_json) == (True, 20, 16, schema)
    assert parse(response_format={"type": "json_object"}).guided_json == {"type": "object"}
    assert (parse(logprobs=True).logprobs, parse(logprobs=True).top_logprobs) == (True, 0)
    completion = parse(COMPLETION, logprobs=0, response_format={"type": "json_object"})
    assert (completion.logprobs, completion.top_logprobs, completion.guided_json) == (True, 0, {"type": "object"})
    assert (parse(COMPLETION, logprobs=5).logprobs, parse(COMPLETION, logprobs=5).top_logprobs) == (True, 5)


def test_the_reservation_counts_max_tokens_for_every_choice():
    one, three = parse(max_tokens=10), parse(max_tokens=10, n=3)
    assert three.tokens_reserved() - one.tokens_reserved() == 20
    assert one.tokens_reserved() == 10 + one.prompt_token_estimate()


def test_tools_and_the_choice_among_them():
    auto = parse(tools=[WEATHER], parallel_tool_calls=False)
    assert (auto.tools, auto.tool_choice, auto.guided_json) == ([WEATHER], "auto", None)
    named = parse(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.guided_json["properties"]["name"] == {"const": "get_weather"}
    assert parse(tools=[WEATHER], tool_choice="required").guided_json == named.guided_json
    none = parse(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"})
    assert (none.tools, none.guided_json) == (None, {"type": "object"})  # the model is told of no tools
    bare = parse(tools=[{"type": "function", "function": {"name": "now", "description": "the time", "x": 1}}])
    assert bare.tools == [{"type": "function", "function": {"name": "now", "description": "the time"}}]
    assert parse(tools=[WEATHER]).prompt_token_estimate() > parse().prompt_token_estimate()  # rendered into the prompt


def test_tool_turns_are_passed_through():
    messages = parse(messages=[*CALLED, {"role": "tool", "tool_call_id": "call_1", "content": [
        {"type": "text", "text": "rain"}]}, {"role": "user", "content": "and tomorrow?"}]).messages
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": CALLED[1]["tool_calls"]}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "rain"}
    assert parse(messages=[{"role": "assistant", "content": "hi", "tool_calls": []}]).messages == [
        {"role": "assistant", "content": "hi"}]  # an empty list, as some clients send, calls nothing


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"logprobs": 1}, "logprobs", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 1.5}, "top_logprobs", "invalid_value"),
    ({"response_format": "json"}, "response_format", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": []}}, "response_format.json_schema", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x" * 65, "schema": {}}}},
     "response_format.json_schema.name", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format.json_schema.schema",
     "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}},
     "response_format", "invalid_value"),
    ({"tools": {}}, "tools", "invalid_value"),
    ({"tools": [WEATHER] * 129}, "tools", "invalid_value"),
    ({"tools": ["get_weather"]}, "tools[0]", "invalid_value"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]", "unsupported_parameter"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools[0].function.description",
     "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters",
     "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
     "tools[0].function.parameters", "invalid_value"),
    ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": ["x"]}}}, "tool_choice",
     "invalid_value"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "invalid_value"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, "messages[0].tool_call_id",
     "invalid_value"),
    ({"messages": [*CALLED, {"role": "tool", "tool_call_id": "call_2", "content": "x"}]}, "messages[2].tool_call_id",
     "invalid_value"),
    ({"messages": [*CALLED, {"role": "tool", "tool_call_id": "call_1"}]}, "messages[2].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": CALLED[1]["tool_calls"]}]}, "messages[0].tool_calls",
     "invalid_value"),
    ({"messages": [{"role": "assistant", "tool_calls": "call"}]}, "messages[0].tool_calls", "invalid_value"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].id", "invalid_value"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls[0].function.arguments", "invalid_value"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "function": {}}]}]},
     "messages[0].tool_calls[0]", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "x", "function_call": {"name": "f"}}]},
     "messages[0].function_call", "unsupported_parameter"),
])
def test_feature_refusals_name_the_parameter(fields, param, code):
    error = refused(**fields)
    assert (error.param, error.code) == (param, code), error.message


def test_a_schema_feature_that_cannot_be_enforced_is_named():
    error = refused(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "string", "format": "x"}}})
    assert "Unknown format: x" in error.message


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"logprobs": 6}, "logprobs", "invalid_value"),
    ({"logprobs": True}, "logprobs", "invalid_value"),
    ({"logprobs": -1}, "logprobs", "invalid_value"),
    ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ({"tools": [WEATHER]}, "tools", "unsupported_parameter"),
    ({"n": 17}, "n", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    ({"best_of": 2}, "best_of", "unsupported_parameter"),
    ({"suffix": "x"}, "suffix", "unsupported_parameter"),
])
def test_completion_feature_refusals_name_the_parameter(fields, param, code):
    error = refused(COMPLETION, **fields)
    assert (error.param, error.code) == (param, code)


def test_a_schema_that_makes_the_grammar_library_panic_is_still_a_400():
    # llguidance panics (a pyo3 PanicException, a BaseException) cutting its error message inside a character.
    schema = {"maxItems": {"a" * 14: 1, "é" * 60: 1}}
    error = refused(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert error.param == "response_format"
