"""Constrained decoding: outputs that follow their JSON schema, checked by jsonschema, on every adapter."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine_daemon import Engine, EngineConfig, SamplingParams
from engine_daemon.engine import RequestError
from engine_daemon.grammars import JSON_OBJECT_SCHEMA, MAX_SCHEMA_BYTES, GrammarError, check_json_schema
from tests.engine.builders import write_adapter, write_tiny_model

# Bounded schemas (short strings, few items), so that a random model ends them within max_tokens.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"label": {"enum": ["spam", "ham", "unsure"]},
                                      "score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["label", "score"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                               "maxItems": 3},
                                      "owner": {"type": "object", "properties": {"id": {"type": "integer"}},
                                                "required": ["id"], "additionalProperties": False}},
     "required": ["ok", "tags", "owner"], "additionalProperties": False},
    {"anyOf": [{"type": "null"}, {"type": "string", "format": "date"}]},
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("guided-model"), with_tokenizer=True)


@pytest.fixture(scope="module")
def engine(chat_model, tmp_path_factory):
    engine = Engine(EngineConfig(model=str(chat_model), device="cpu", dtype="float32", max_num_seqs=64))
    for name, seed in (("one", 1), ("two", 2)):
        engine.add_adapter(name, str(write_adapter(chat_model, tmp_path_factory.mktemp(name), r=4, seed=seed)))
    yield engine
    engine.close()


def test_fifty_outputs_over_the_base_model_and_two_adapters_all_validate(engine):
    prompts = [f"Request {i}: describe it as JSON" for i in range(50)]
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(50)]
    adapters = [(None, "one", "two")[i % 3] for i in range(50)]
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=i, guided_json=schema)
              for i, schema in enumerate(schemas)]
    outputs = engine.generate(prompts, params, adapters)
    for out, schema in zip(outputs, schemas, strict=True):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_json_object_and_a_guided_request_beside_free_ones(engine):
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = engine.generate(["Ahoy matey"], free)[0]
    mixed = engine.generate(["Ahoy matey", "Ahoy matey"],
                            [free, SamplingParams(max_tokens=150, temperature=1.0, seed=3, guided_json=JSON_OBJECT_SCHEMA)])
    assert mixed[0].token_ids == alone.token_ids  # a neighbour's mask never touches another row
    assert isinstance(json.loads(mixed[1].text), dict)


def test_every_choice_of_a_guided_request_follows_the_schema(engine):
    out = engine.generate(["Pick"], SamplingParams(max_tokens=120, temperature=1.0, seed=9, n=4,
                                                   guided_json=SCHEMAS[0]), ["one"])[0]
    assert len(out.choices) == 4
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.text), SCHEMAS[0])


def test_a_schema_feature_that_cannot_be_enforced_is_refused_by_name(engine):
    for schema, named in (({"not": {"type": "string"}}, "not"), ({"type": "array", "uniqueItems": True}, "uniqueItems"),
                          ({"type": "string", "format": "no-such-format"}, "no-such-format")):
        with pytest.raises(GrammarError, match=named):
            check_json_schema(schema)
        with pytest.raises(RequestError, match=named) as refused:
            engine.add_request("x", SamplingParams(guided_json=schema))
        assert refused.value.code == "invalid_schema"
    assert not engine.has_unfinished()


def test_an_oversized_schema_is_refused_before_it_is_compiled():
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(MAX_SCHEMA_BYTES // 20)}}
    with pytest.raises(GrammarError, match="bytes"):
        check_json_schema(huge)


def test_a_model_without_a_tokenizer_refuses_guided_requests(tiny_llama):
    engine = Engine(EngineConfig(model=str(tiny_llama), device="cpu", dtype="float32"))
    with pytest.raises(RequestError, match="no tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(guided_json=JSON_OBJECT_SCHEMA))
    engine.close()


HOSTILE = {
    "nested 200 deep": json.loads('{"type": "array", "items": ' * 200 + '{"type": "integer"}' + "}" * 200),
    "catastrophic regex": {"type": "string", "pattern": "^(a|b)*a(a|b){20}$"},
    "huge repetition": {"type": "string", "pattern": "^a{1000}b{1000}$"},
    "300 alternatives": {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "string"}},
                                    "required": [f"k{i}"]} for i in range(300)]},
    "recursive": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
                  "$ref": "#/$defs/n"},
    "remote ref": {"$ref": "http://127.0.0.1:9/schema.json"},
    "100000 items": {"type": "array", "items": {"type": "string"}, "minItems": 100_000},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_schema_is_refused_or_decodes_under_the_step_bound(engine, name):
    """Each compiles within llguidance's limits and decodes a few steps, or is refused by name; the
    engine loop serves the next request either way (no remote fetch, no recursion without end)."""
    try:
        check_json_schema(HOSTILE[name])
    except GrammarError as exc:
        assert str(exc)
        with pytest.raises(RequestError):
            engine.add_request("x", SamplingParams(guided_json=HOSTILE[name]))
    else:
        out = engine.generate(["x"], SamplingParams(max_tokens=6, temperature=1.0, seed=1,
                                                    guided_json=HOSTILE[name]))[0]
        assert out.finish_reason in ("length", "stop", "error")
    after = engine.generate(["Ahoy"], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(after.token_ids) == 3


def test_a_schema_that_makes_the_grammar_library_panic_fails_only_its_request(engine):
    panics = {"maxItems": {"a" * 14: 1, "é" * 60: 1}}  # llguidance cuts its message inside a character
    with pytest.raises(GrammarError, match="grammar library failed"):
        check_json_schema(panics)
    with pytest.raises(RequestError, match="grammar library failed"):
        engine.add_request("x", SamplingParams(guided_json=panics))


def test_a_grammar_that_fails_mid_step_ends_every_choice_of_its_request_once(engine, monkeypatch):
    """Choice 0's mask fails (out of lexer fuel, say) in the step where its sibling reaches
    max_tokens: the request ends once, in error, without the refused token, and the loop lives on."""
    import engine_daemon.engine as engine_module

    real, calls = engine_module.allowed_tokens, []

    def failing_on_the_second_step(matchers, vocab_size, device):
        allowed, broken = real(matchers, vocab_size, device)
        calls.append(1)
        return allowed, ({0: "lexer fuel exhausted"} if len(calls) == 2 else broken)

    monkeypatch.setattr(engine_module, "allowed_tokens", failing_on_the_second_step)
    request = engine.add_request("hello", SamplingParams(max_tokens=2, temperature=1.0, seed=1, n=2,
                                                         guided_json=JSON_OBJECT_SCHEMA))
    ends = []
    while engine.has_unfinished():
        ends += [out for out in engine.step() if out.finished]
    assert len(ends) == 1 and ends[0].finish_reason == "error" and "lexer fuel" in ends[0].error
    assert ends[0].new_token_ids == []
    result = engine.pop_finished(request)
    assert [choice.finish_reason for choice in result.choices] == ["error", "error"]
    assert [len(choice.token_ids) for choice in result.choices] == [1, 1]  # the refused tokens were not kept
    monkeypatch.undo()
    assert len(engine.generate(["Ahoy"], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_a_tokenizer_larger_than_the_models_vocabulary_refuses_guided_requests_by_name(tmp_path):
    model = write_tiny_model(tmp_path / "short-vocab", with_tokenizer=True, vocab_size=400)
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))
    for _ in range(2):  # and keeps saying so, without building it again
        with pytest.raises(RequestError, match="cannot drive constrained decoding"):
            engine.add_request("x", SamplingParams(guided_json=JSON_OBJECT_SCHEMA))
    engine.close()
