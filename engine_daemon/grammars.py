"""JSON schemas as grammars for constrained decoding, checked before any work is queued.

Torch-free: the portal checks a request's schema here (a 400 that names what is wrong), the
engine compiles the same grammar for its token masks (``guided``). The grammar library is
llguidance: its Rust core builds each step's token mask in microseconds, reads the model's
``tokenizers`` JSON as it is, and refuses by name the schema keywords it cannot enforce, so an
unsupported feature is never a silently unconstrained run.

The JSON is written in one fixed layout, ``{"a": 1, "b": [2, 3]}`` (Python's ``json.dumps``): the
separators a model most often writes, and no runs of whitespace for a weak model to loop in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_SCHEMA_BYTES = 64 * 1024  # a schema is compiled per request: its size bounds the work
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}  # response_format {"type": "json_object"}
# The layout of the generated JSON (llguidance's "x-guidance" options).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema that cannot be enforced: not JSON Schema, too large, or a feature the library lacks."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of a JSON schema; GrammarError names what cannot be enforced."""
    import llguidance

    if not isinstance(schema, dict):
        raise GrammarError(f"the schema must be a JSON object, got {type(schema).__name__}")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    try:
        grammar = guarded(llguidance.LLMatcher.grammar_from_json_schema, schema, defaults=_LAYOUT)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"the schema cannot be read: {exc}") from None
    problem = guarded(llguidance.LLMatcher.validate_grammar, grammar, None)
    if problem:
        raise GrammarError(one_line(problem))
    return grammar


def guarded(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A call into llguidance whose Rust panic (a BaseException, which no ``except Exception``
    stops) becomes a GrammarError: a schema that trips the library fails its own request only."""
    try:
        return call(*args, **kwargs)
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise GrammarError(f"the grammar library failed on this schema: {one_line(str(exc))[:300]}") from None


def check_json_schema(schema: dict[str, Any]) -> None:
    """Raise GrammarError if the engine could not enforce ``schema``."""
    json_schema_grammar(schema)


def one_line(problem: str) -> str:
    """llguidance's message, on one line, with its name for the cause kept ("Unimplemented keys: ["not"]")."""
    return " ".join(problem.split())
