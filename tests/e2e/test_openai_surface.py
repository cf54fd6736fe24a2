"""logprobs, n, structured output and tools through the official openai client, against the real stack.

The reference is the offline ``Engine`` on the same model and adapters; JSON outputs are checked
with ``jsonschema``, an implementation nobody here wrote.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from engine_daemon.sampling import SamplingParams
from tests.e2e.conftest import TINY_MODEL
from tests.e2e.test_serving import MESSAGES, pending, usage_of

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
VERDICT = {"type": "object", "properties": {"label": {"enum": ["spam", "ham"]}, "sure": {"type": "boolean"}},
           "required": ["label", "sure"], "additionalProperties": False}
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Find a word in the dictionary",
    "parameters": {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8}},
                   "required": ["word"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_chat_logprobs_are_the_offline_engines_streamed_and_not(stack):
    client = stack.openai()
    want = stack.offline_engine().chat([MESSAGES], SamplingParams(max_tokens=12, temperature=0.0, logprobs=True,
                                                                   top_logprobs=3), adapters=["parrot"])[0]
    whole = client.chat.completions.create(model="parrot", messages=MESSAGES, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx(want.logprobs, abs=1e-5)
    engine = stack.offline_engine()
    for entry, token, alternatives in zip(content, want.token_ids, want.top_logprobs, strict=True):
        assert bytes(entry.bytes) == engine.tokenizer.token_bytes(token)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(list(alternatives.values()), abs=1e-5)
    chunks = list(client.chat.completions.create(model="parrot", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [entry.token for entry in streamed] == [entry.token for entry in content]
    assert [entry.logprob for entry in streamed] == pytest.approx(want.logprobs, abs=1e-5)
    plain = client.chat.completions.create(model="parrot", messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(stack):
    client = stack.openai()
    want = stack.offline_engine().generate(["The quick brown fox"], SamplingParams(
        max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2))[0]
    whole = client.completions.create(model=TINY_MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0,
                                      logprobs=2)
    logprobs = whole.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert "".join(logprobs.tokens) == whole.choices[0].text
    assert [len(alternatives) for alternatives in logprobs.top_logprobs] == [2] * 8


def test_n_seeded_choices_repeat_and_the_prompt_is_billed_once(stack):
    client = stack.openai()
    want = stack.offline_engine().chat([MESSAGES], SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=3),
                                       adapters=["pelican"])[0]
    runs = []
    for _ in range(2):
        whole = client.chat.completions.create(model="pelican", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                               seed=7, n=3)
        assert [choice.index for choice in whole.choices] == [0, 1, 2]
        runs.append([choice.message.content for choice in whole.choices])
        assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
        assert whole.usage.completion_tokens == sum(len(choice.token_ids) for choice in want.choices)
    assert runs[0] == runs[1] == [choice.text for choice in want.choices]
    assert len(set(runs[0])) > 1
    record = usage_of(whole.id)
    assert record.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model="pelican", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                                 seed=7, n=3, stream=True))
    texts = {0: "", 1: "", 2: ""}
    reasons = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == runs[0]
    assert sorted(reasons) == [0, 1, 2]


def test_fifty_json_schema_answers_over_the_base_model_and_two_adapters_all_validate(stack):
    schemas = [PERSON, VERDICT]
    models = [TINY_MODEL, "parrot", "pelican"]

    async def ask(client: openai.AsyncOpenAI, i: int) -> tuple[dict, str, str]:
        schema = schemas[i % 2]
        reply = await client.chat.completions.create(
            model=models[i % 3], messages=[{"role": "user", "content": f"Describe case {i} as JSON"}],
            max_tokens=100, temperature=1.0, seed=i, response_format=schema_format(schema))
        return schema, reply.choices[0].message.content, reply.choices[0].finish_reason

    async def all_of_them() -> list[tuple[dict, str, str]]:
        async with stack.async_openai() as client:
            return await asyncio.gather(*(ask(client, i) for i in range(50)))

    for schema, text, reason in asyncio.run(all_of_them()):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert pending(stack) == 0


def test_json_object_streamed_and_an_unenforceable_schema_refused_by_name(stack):
    client = stack.openai()
    # Any object: a random model may write a string for ever, so some seeds run out of tokens; those
    # that end have written an object.
    ended = 0
    for seed in range(8):
        chunks = list(stack.openai("tenant-b").chat.completions.create(  # kraken is tenant-b's
            model="kraken", messages=MESSAGES, max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_object"}, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended >= 2
    text_format = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                                 response_format={"type": "text"})
    assert text_format.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=4, response_format=schema_format(
            {"type": "array", "uniqueItems": True}))


def test_a_named_tool_choice_always_yields_a_parseable_call_and_the_result_is_taken_next_turn(stack):
    client = stack.openai()
    messages = [{"role": "user", "content": "What does 'sea' mean?"}]
    for seed in range(5):
        reply = client.chat.completions.create(
            model="parrot", messages=messages, tools=[LOOKUP, WEATHER], max_tokens=80, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "weather"}})
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    required = client.chat.completions.create(model=TINY_MODEL, messages=messages, tools=[LOOKUP, WEATHER],
                                              tool_choice="required", max_tokens=80, temperature=1.0, seed=1)
    (call,) = required.choices[0].message.tool_calls
    assert call.function.name in ("lookup", "weather")
    # The next turn carries the call and its result; the model answers in text.
    follow_up = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model=TINY_MODEL, messages=follow_up, tools=[LOOKUP, WEATHER],
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.tool_calls is None
    streamed = list(client.chat.completions.create(
        model="parrot", messages=messages, tools=[LOOKUP], tool_choice={"type": "function",
                                                                        "function": {"name": "lookup"}},
        max_tokens=80, temperature=1.0, seed=3, stream=True))
    calls = [call for c in streamed if c.choices and c.choices[0].delta.tool_calls for call in c.choices[0].delta.tool_calls]
    assert calls and calls[0].function.name == "lookup"
    json.loads("".join(call.function.arguments or "" for call in calls))
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
    assert pending(stack) == 0
