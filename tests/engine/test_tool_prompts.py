"""Tools in the engine's prompt: the template's own rendering where it has one, else the generic block."""

from __future__ import annotations

import json

import pytest

from engine_daemon import Engine, EngineConfig
from engine_daemon.engine import RequestError
from tests.engine.builders import write_tiny_model

LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Find a word",
                                           "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}
# A template that renders tools itself, the way HF's tool-aware templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTOOLS:' }}{% for tool in tools %}{{ ' ' + tool['function']['name'] }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}{{ 'CALL ' + call['function']['name'] + ' ' }}"
    "{{ call['function']['arguments'] | tojson }}{% endfor %}{% else %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TURNS = [
    {"role": "user", "content": "What does sea mean?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"word\": \"sea\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a large body of salt water"},
]


def rendered(engine: Engine, messages, tools=None) -> str:
    return engine.tokenizer.decode(engine.encode(None, messages, tools), skip_special_tokens=False)


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("generic"), with_tokenizer=True, max_position_embeddings=2048)
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))
    yield engine
    engine.close()


def test_a_template_without_tools_gets_the_generic_block_and_tool_turns_as_text(generic):
    text = rendered(generic, TURNS, [LOOKUP])
    assert "<tools>" in text and json.dumps(LOOKUP) in text
    assert '<tool_call>\n{"name": "lookup", "arguments": {"word": "sea"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\na large body of salt water\n</tool_response>" in text
    # A later turn without tools still renders its tool messages.
    assert "<tool_response>" in rendered(generic, TURNS)


def test_a_template_that_knows_tools_renders_them_itself(tmp_path):
    model = write_tiny_model(tmp_path / "native", with_tokenizer=True, max_position_embeddings=2048)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": TOOLS_TEMPLATE}))
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))
    text = rendered(engine, TURNS, [LOOKUP])
    assert text.startswith("<|im_start|>system\nTOOLS: lookup<|im_end|>")
    assert "<tools>" not in text
    assert 'CALL lookup {"word": "sea"}' in text  # arguments as an object, written once with tojson
    engine.close()


def test_messages_the_template_cannot_take_are_the_requests_error(generic):
    with pytest.raises(RequestError, match="chat template"):
        generic.encode(None, [{"role": "user"}], [LOOKUP])
