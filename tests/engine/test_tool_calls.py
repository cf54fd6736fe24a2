"""engine_daemon.tool_calls: tools into the prompt, the schema of a forced call, calls read back from text."""

from __future__ import annotations

import json
import subprocess
import sys

import jinja2
import pytest

from engine_daemon.grammars import check_json_schema
from engine_daemon.tool_calls import (
    messages_for_template,
    parse_tool_calls,
    template_supports_tools,
    tool_call_schema,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: it takes none
TOOLS = [WEATHER, CLOCK]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "id": "call_2",
                                                                "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 7 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]
# A template that knows only system, user and assistant, and insists that they alternate after the system turn.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
    "{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}{{ raise_exception('roles must alternate') }}"
    "{% endif %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
)
QWEN_LIKE = "{%- if tools %}{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}{%- endif %}{{ messages }}"


def render(template: str, messages: list[dict]) -> str:
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    return jinja2.Environment().from_string(template).render(messages=messages, raise_exception=raise_exception)


def test_a_template_supports_tools_when_it_uses_the_variable():
    assert template_supports_tools(QWEN_LIKE)
    assert template_supports_tools("{% for t in tools %}{{ t }}{% endfor %}")
    assert not template_supports_tools(PLAIN_TEMPLATE)
    assert not template_supports_tools("You can use tools. {{ messages }}")  # the word in the text is no variable
    assert not template_supports_tools(None) and not template_supports_tools("")


def test_a_native_template_gets_the_messages_with_arguments_as_objects():
    rendered = messages_for_template(CONVERSATION, TOOLS, native=True)
    assert rendered[0] == CONVERSATION[0] and rendered[2:] == CONVERSATION[2:]
    assert rendered[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert CONVERSATION[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # the input is kept


def test_the_generic_block_renders_through_a_template_that_knows_no_tools():
    rendered = messages_for_template(CONVERSATION, TOOLS, native=False)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    system = rendered[0]["content"]
    assert "<tools>" in system and json.dumps(WEATHER) in system and "<tool_call>" in system
    assert rendered[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                      '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert rendered[3]["content"] == ("<tool_response>\nrain, 7 C\n</tool_response>\n"
                                      "<tool_response>\n12:00\n</tool_response>")  # one turn for a run of results
    assert all(set(m) == {"role", "content"} for m in rendered)
    text = render(PLAIN_TEMPLATE, rendered)
    assert text.startswith("<|system|># Tools") and "<|user|><tool_response>" in text


def test_the_generic_block_joins_an_existing_system_message():
    rendered = messages_for_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"}], [WEATHER], native=False)
    assert len(rendered) == 2 and rendered[0]["content"].startswith("Be brief.\n\n# Tools")


def test_tool_turns_render_without_tools_too():
    """tool_choice "none" sends no tools, but the conversation may hold earlier calls."""
    rendered = messages_for_template(CONVERSATION, None, native=False)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    assert messages_for_template([{"role": "user", "content": "hi"}], None, native=False) == [
        {"role": "user", "content": "hi"}]


def test_a_named_function_schema_forces_that_call():
    schema = tool_call_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert schema == {"type": "object", "properties": {"name": {"const": "get_weather"},
                                                       "arguments": WEATHER["function"]["parameters"]},
                      "required": ["name", "arguments"], "additionalProperties": False}
    check_json_schema(schema)  # the engine's grammar library can enforce it
    with pytest.raises(ValueError, match="not among the tools"):
        tool_call_schema(TOOLS, {"type": "function", "function": {"name": "nope"}})


def test_required_is_any_of_the_tools():
    schema = tool_call_schema(TOOLS, "required")
    assert [s["properties"]["name"] for s in schema["anyOf"]] == [{"const": "get_weather"}, {"const": "now"}]
    assert schema["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {},
                                                             "additionalProperties": False}
    check_json_schema(schema)
    assert tool_call_schema([WEATHER], "required")["properties"]["name"] == {"const": "get_weather"}


def test_tagged_calls_are_read_and_the_rest_is_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me check."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                                              {"name": "now", "arguments": "{}"}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_a_whole_json_object_is_a_call_as_constrained_output_and_llama_write_it():
    content, calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Köln"}}', TOOLS)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Köln"}
    content, calls = parse_tool_calls(' {"name": "now", "parameters": {}}\n', TOOLS)
    assert content is None and calls[0]["function"] == {"name": "now", "arguments": "{}"}
    _content, calls = parse_tool_calls('{"name": "now", "arguments": "{}"}', TOOLS)  # arguments as a JSON string
    assert calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("text", [
    "It rains in Oslo.",
    '<tool_call>{"name": "launch_missiles", "arguments": {}}</tool_call>',  # no such tool
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"name": "now", "arguments": [1]}</tool_call>',  # arguments are an object
    '{"name": "get_weather"}',
    '{"answer": 42}',
    "",
])
def test_text_that_holds_no_call_of_a_declared_tool_is_content(text):
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_an_unknown_call_stays_in_the_content_beside_a_known_one():
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(f'{bad}\n<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>', TOOLS)
    assert content == bad and [c["function"]["name"] for c in calls] == ["now"]


def test_the_module_does_not_import_torch():
    code = "import sys, engine_daemon.tool_calls, engine_daemon.grammars; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
