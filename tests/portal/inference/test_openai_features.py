"""logprobs, n, response_format and tools on /v1: the real portal and Redis, a scripted engine (FakeEngine), and
the official ``openai`` client, which must accept every answer. What the engine was asked is read off the wire."""

from __future__ import annotations

import json

import openai
import pytest

from engine_daemon.grammars import JSON_OBJECT_SCHEMA
from engine_daemon.protocol import DeltaEvent, DoneEvent
from engine_daemon.tool_calls import tool_call_schema
from portal.usage.models import Usage
from tests.portal.inference.conftest import openai_client, run
from tests.portal.inference.fake_engine import choices, logprob_entry
from tests.portal.inference.test_api import CHAT, assert_error, post, sse_events

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES = CHAT["messages"]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
OSLO = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'


def chat(secret: str, **kwargs):
    async def main():
        return await openai_client(secret).chat.completions.create(model="random:tiny", **kwargs)

    return run(main)


def chat_stream(secret: str, **kwargs) -> list:
    async def main():
        stream = await openai_client(secret).chat.completions.create(model="random:tiny", stream=True, **kwargs)
        return [chunk async for chunk in stream]

    return run(main)


def complete(secret: str, **kwargs):
    async def main():
        client = openai_client(secret)
        if not kwargs.get("stream"):
            return await client.completions.create(model="random:tiny", **kwargs)
        return [chunk async for chunk in await client.completions.create(model="random:tiny", **kwargs)]

    return run(main)


def by_choice(chunks: list) -> dict[int, list]:
    """The stream's choice deltas grouped by their index."""
    grouped: dict[int, list] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            grouped.setdefault(choice.index, []).append(choice)
    return grouped


def the_request(engine):
    [request] = engine.requests
    return request


# ---- logprobs --------------------------------------------------------------------------------------


def test_chat_logprobs_are_the_engines_entries_streamed_and_not(engine, secret):
    engine.script = choices(["Ahoy", " there"])
    answer = chat(secret, messages=MESSAGES, logprobs=True, top_logprobs=2)
    expected = [logprob_entry("Ahoy", 0, 2), logprob_entry(" there", 1, 2)]
    assert [entry.model_dump() for entry in answer.choices[0].logprobs.content] == expected
    assert answer.choices[0].logprobs.content[0].top_logprobs[1].token == "alt1"
    sampling = the_request(engine).sampling
    assert (sampling["logprobs"], sampling["top_logprobs"]) == (True, 2)

    chunks = chat_stream(secret, messages=MESSAGES, logprobs=True, top_logprobs=2)
    streamed = [entry.model_dump() for c in chunks for choice in c.choices if choice.logprobs
                for entry in choice.logprobs.content]
    assert streamed == expected and "".join(c.choices[0].delta.content or "" for c in chunks) == "Ahoy there"


def test_without_logprobs_asked_there_are_none(engine, secret):
    engine.script = choices(["Ahoy"])
    assert chat(secret, messages=MESSAGES).choices[0].logprobs is None
    assert all(choice.logprobs is None for c in chat_stream(secret, messages=MESSAGES) for choice in c.choices)


def test_completion_logprobs_are_openais_legacy_columns_streamed_and_not(engine, secret):
    engine.script = choices(["Ahoy", " there", "!"])
    answer = complete(secret, prompt="x", logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == ["Ahoy", " there", "!"]
    assert logprobs.token_logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert logprobs.top_logprobs == [{"Ahoy": -0.1, "alt1": pytest.approx(-1.1)},
                                     {" there": -0.2, "alt1": pytest.approx(-1.2)},
                                     {"!": pytest.approx(-0.3), "alt1": pytest.approx(-1.3)}]
    assert logprobs.text_offset == [0, 4, 10]
    sampling = the_request(engine).sampling
    assert (sampling["logprobs"], sampling["top_logprobs"]) == (True, 2)

    chunks = complete(secret, prompt="x", logprobs=2, stream=True)
    columns = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in columns for t in lp.tokens] == ["Ahoy", " there", "!"]
    assert [o for lp in columns for o in lp.text_offset] == [0, 4, 10]


# ---- n ---------------------------------------------------------------------------------------------


def test_n_choices_each_with_its_index_text_and_finish_and_the_prompt_counted_once(engine, secret):
    engine.script = choices(["Ahoy"], ["Arr", " matey"], ["Yo", " ho", " ho"])
    answer = chat(secret, messages=MESSAGES, n=3, seed=5)
    assert [(c.index, c.message.content, c.finish_reason) for c in answer.choices] == [
        (0, "Ahoy", "stop"), (1, "Arr matey", "stop"), (2, "Yo ho ho", "stop")]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 6)
    assert the_request(engine).sampling["n"] == 3
    record = Usage.objects.get()
    assert (record.prompt_tokens, record.completion_tokens) == (7, 6)

    text = complete(secret, prompt="x", n=3)
    assert [c.text for c in text.choices] == ["Ahoy", "Arr matey", "Yo ho ho"]


def test_n_choices_stream_with_their_index_and_one_usage_chunk(engine, secret):
    engine.script = choices(["Ahoy"], ["Arr", " matey"], ["Yo", " ho", " ho"])
    chunks = chat_stream(secret, messages=MESSAGES, n=3, stream_options={"include_usage": True})
    grouped = by_choice(chunks)
    assert sorted(grouped) == [0, 1, 2]
    assert ["".join(d.delta.content or "" for d in grouped[i]) for i in range(3)] == ["Ahoy", "Arr matey", "Yo ho ho"]
    for deltas in grouped.values():
        assert deltas[0].delta.role == "assistant"
        assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["stop"]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and (usage[0].prompt_tokens, usage[0].completion_tokens) == (7, 6)
    assert chunks[-1].choices == []
    # the interleaving of the engine's steps is kept: choice 0 ends before the others' second tokens
    order = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert order.index((0, "stop")) < order.index((2, "stop"))


def test_choices_an_older_engine_ends_only_with_done_get_their_finish_reasons(engine, auth):
    engine.script = lambda request: [DeltaEvent("a", [1], index=0), DeltaEvent("b", [2], index=1),
                                     DoneEvent("length", 3, 2)]
    body = post("/v1/chat/completions", {**CHAT, "n": 2}, auth).json()
    assert [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [("a", "length"),
                                                                                        ("b", "length")]
    events = sse_events(post("/v1/chat/completions", {**CHAT, "n": 2, "stream": True}, auth).content)
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in events[:-1]
                if c["choices"][0]["finish_reason"]]
    assert finishes == [(0, "length"), (1, "length")]


def test_an_engine_that_sends_a_choice_not_asked_for_is_a_500(engine, auth):
    engine.script = lambda request: [DeltaEvent("a", [1], index=1), DoneEvent("stop", 3, 1)]
    assert_error(post("/v1/chat/completions", CHAT, auth), 500, "engine_error")


def test_the_token_reservation_counts_every_choice(engine, auth, tenant):
    tenant.tokens_per_minute = 600
    tenant.save()
    assert post("/v1/chat/completions", {**CHAT, "max_tokens": 300}, auth).status_code == 200
    error = assert_error(post("/v1/chat/completions", {**CHAT, "max_tokens": 300, "n": 2}, auth), 400,
                         "invalid_value", "max_tokens")
    assert "each of its n choices" in error["message"]


# ---- response_format -------------------------------------------------------------------------------


def test_a_json_schema_reaches_the_engine_as_guided_json(engine, secret):
    schema = {"type": "object", "properties": {"pirate": {"type": "boolean"}}, "required": ["pirate"]}
    engine.script = choices(['{"pirate": true}'])
    answer = chat(secret, messages=MESSAGES, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    assert json.loads(answer.choices[0].message.content) == {"pirate": True}
    assert the_request(engine).sampling["guided_json"] == schema

    engine.requests.clear()
    complete(secret, prompt="x", extra_body={"response_format": {"type": "json_object"}})  # vLLM's, on completions
    assert the_request(engine).sampling["guided_json"] == JSON_OBJECT_SCHEMA
    engine.requests.clear()
    chat(secret, messages=MESSAGES, response_format={"type": "text"})
    assert the_request(engine).sampling["guided_json"] is None


def test_a_schema_feature_the_engine_cannot_enforce_is_a_400_naming_it_before_anything_is_queued(engine, secret):
    schema = {"type": "object", "not": {"required": ["x"]}}

    async def main():
        with pytest.raises(openai.BadRequestError) as caught:
            await openai_client(secret).chat.completions.create(model="random:tiny", messages=MESSAGES,
                                                                response_format={"type": "json_schema", "json_schema": {
                                                                    "name": "x", "schema": schema}})
        return caught.value

    error = run(main)
    assert error.code == "invalid_value" and error.param == "response_format" and '"not"' in error.message
    assert engine.requests == []


# ---- tools -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_forced_call_is_constrained_to_its_schema_and_answered_as_tool_calls(engine, secret, tool_choice):
    engine.script = choices([OSLO])
    answer = chat(secret, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice)
    request = the_request(engine)
    assert request.tools == TOOLS and request.sampling["guided_json"] == tool_call_schema(TOOLS, tool_choice)
    [choice] = answer.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})


def test_a_streamed_call_arrives_whole_in_one_tool_calls_delta(engine, secret):
    engine.script = choices(['{"name": "get_weather", ', '"arguments": {"city": ', '"Oslo"}}'])
    chunks = chat_stream(secret, messages=MESSAGES, tools=TOOLS, tool_choice="required")
    deltas = [c.choices[0] for c in chunks]
    assert [d.delta.content for d in deltas] == ["", None, None]  # the role chunk; no text of the call
    assert deltas[0].delta.role == "assistant"
    [call] = deltas[1].delta.tool_calls
    assert (call.index, call.type, call.function.name) == (0, "function", "get_weather")
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert deltas[2].finish_reason == "tool_calls"


def test_auto_reads_tagged_calls_and_leaves_plain_answers_as_content(engine, secret):
    engine.script = choices(["Let me look.", f"<tool_call>\n{OSLO}\n</tool_call>"])
    answer = chat(secret, messages=MESSAGES, tools=TOOLS)  # tool_choice defaults to auto with tools
    request = the_request(engine)
    assert request.tools == TOOLS and request.sampling["guided_json"] is None
    message = answer.choices[0].message
    assert message.content == "Let me look." and message.tool_calls[0].function.name == "get_weather"
    assert answer.choices[0].finish_reason == "tool_calls"

    engine.script = choices(["It", " rains."])
    plain = chat(secret, messages=MESSAGES, tools=TOOLS, tool_choice="auto")
    assert (plain.choices[0].message.content, plain.choices[0].message.tool_calls) == ("It rains.", None)
    assert plain.choices[0].finish_reason == "stop"
    streamed = chat_stream(secret, messages=MESSAGES, tools=TOOLS)
    assert [c.choices[0].delta.content for c in streamed] == ["", "It rains.", None]  # held back, then whole
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false_answers_with_the_first_call_only(engine, secret):
    noon = '{"name": "now", "arguments": {}}'
    engine.script = choices([f"<tool_call>{OSLO}</tool_call>", f"<tool_call>{noon}</tool_call>"])
    both = chat(secret, messages=MESSAGES, tools=TOOLS)
    assert [call.function.name for call in both.choices[0].message.tool_calls] == ["get_weather", "now"]
    one = chat(secret, messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False)
    assert [call.function.name for call in one.choices[0].message.tool_calls] == ["get_weather"]
    assert one.choices[0].finish_reason == "tool_calls"
    streamed = chat_stream(secret, messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False)
    calls = [call for c in streamed if c.choices and c.choices[0].delta.tool_calls for call in c.choices[0].delta.tool_calls]
    assert [call.function.name for call in calls] == ["get_weather"]


def test_tool_choice_none_tells_the_engine_of_no_tools_and_reads_no_calls(engine, secret):
    engine.script = choices([OSLO])
    answer = chat(secret, messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert the_request(engine).tools is None and the_request(engine).sampling["guided_json"] is None
    assert answer.choices[0].message.content == OSLO and answer.choices[0].message.tool_calls is None


def test_the_next_turn_carries_the_call_and_its_result_to_the_engine(engine, secret):
    engine.script = choices([OSLO])
    first = chat(secret, messages=MESSAGES, tools=TOOLS, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    engine.requests.clear()
    engine.script = choices(["Rain in Oslo."])
    history = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "rain, 7 C"}]
    answer = chat(secret, messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == "Rain in Oslo."
    assert the_request(engine).messages == [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "rain, 7 C"},
    ]


def test_tool_refusals_name_the_parameter(engine, auth):
    cases = [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "rain"}]}, "messages[0].tool_call_id"),
    ]
    for fields, param in cases:
        assert_error(post("/v1/chat/completions", {**CHAT, **fields}, auth), 400, "invalid_value", param)
    assert engine.requests == []
