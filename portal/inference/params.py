"""The body of ``POST /v1/chat/completions`` and ``POST /v1/completions``, checked the way OpenAI checks it.

Every refusal is an ``InferenceError`` that names the parameter (``param``) and the fix. Parameters
this server does not implement are refused by name rather than ignored, except where the value
asks for nothing (``null``, ``echo: false``), which common clients send. A JSON schema (of
``response_format`` or a tool's parameters) is checked here by the grammar library the engine
enforces it with, so a feature it cannot enforce is a 400 naming it before anything is queued.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from engine_daemon import tool_calls
from engine_daemon.grammars import JSON_OBJECT_SCHEMA, GrammarError, check_json_schema
from engine_daemon.protocol import MAX_CHOICES, MAX_TOP_LOGPROBS, SamplingParams
from portal.inference.errors import InferenceError

CHAT = "chat"
COMPLETION = "completion"

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user", "n",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "response_format"}
ACCEPTED = {CHAT: _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                             "parallel_tool_calls"},
            COMPLETION: _COMMON | {"prompt"}}
# Values of parameters we do not implement that ask for nothing different from what we do.
NEUTRAL = {"echo": False}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 300  # tokens one request may bias, as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs: k alternatives, as OpenAI allows
MAX_TOOLS = 128  # as OpenAI allows
TOOL_CHOICES = ("none", "auto", "required")
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function and json_schema names


@dataclass(frozen=True)
class CompletionParams:
    kind: str  # CHAT | COMPLETION
    model: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → bias added to its logit
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    guided_json: dict[str, Any] | None = None  # the schema the output must follow (response_format, a forced call)
    # chat: {"role", "content"} with text content; an assistant's may add "tool_calls", a tool's is
    # {"role": "tool", "tool_call_id", "content"}
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None  # completion
    # The tools the engine renders into the prompt and whose calls the answer is read for: None when
    # there are none, or when tool_choice is "none" (the model is told of no tools then).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "none"
    parallel_tool_calls: bool = True  # False: an answer holds at most one call (the first the model wrote)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == CHAT else "prompt"

    def sampling(self) -> dict[str, Any]:
        """``InferenceRequest.sampling``: the engine's ``SamplingParams``, in its wire form."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=list(self.stop), presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=dict(self.logit_bias),
                              logprobs=self.logprobs, top_logprobs=self.top_logprobs, n=self.n,
                              guided_json=self.guided_json).to_wire()

    def prompt_token_estimate(self) -> int:
        """A rough prompt size for admission (the engine owns the tokenizer): ~4 characters a token."""
        if self.messages is not None:
            tools = math.ceil(len(json.dumps(self.tools)) / 4) if self.tools else 0
            return tools + sum(4 + math.ceil(_message_characters(m) / 4) for m in self.messages)
        return math.ceil(len(self.prompt or "") / 4)

    def tokens_reserved(self) -> int:
        """The most tokens the request may use: the prompt once, and max_tokens for each choice."""
        return self.n * self.max_tokens + self.prompt_token_estimate()


def _message_characters(message: dict[str, Any]) -> int:
    calls = message.get("tool_calls")
    return len(message["content"]) + (len(json.dumps(calls)) if calls else 0)


# No tokenizer we serve puts more UTF-8 bytes than this into one token (long runs of one character are the
# longest), so bytes / MAX_BYTES_PER_TOKEN never counts more tokens than a prompt really has.
MAX_BYTES_PER_TOKEN = 64


def prompt_token_floor(params: CompletionParams) -> tuple[int, int]:
    """(the fewest tokens the prompt can be, its UTF-8 bytes): refusing past the context on this is never wrong."""
    if params.messages is not None:
        size = sum(len(m["content"].encode()) for m in params.messages)
    else:
        size = len((params.prompt or "").encode())
    return size // MAX_BYTES_PER_TOKEN, size


def body_parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise InferenceError("the request body nests arrays or objects too deeply to read; flatten it",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise InferenceError("the request body must be a JSON object", code="invalid_json")
    _refuse_lone_surrogates(body)
    return body


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """JSON may escape half of a UTF-16 pair (``"\\ud800"``); that is no character, and no text can hold it."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        half = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
        raise InferenceError(f"the request body holds {half}, half of a UTF-16 surrogate pair, which is not text; "
                             "send characters as UTF-8, or escape one outside the BMP as a whole pair",
                             code="invalid_json") from None


def completion_params_parse(body: dict[str, Any], *, kind: str) -> CompletionParams:
    _refuse_unsupported(body, kind)
    given = {k: v for k, v in body.items() if v is not None}
    model = given.get("model")
    if not isinstance(model, str) or not model:
        raise _missing("model", "name a base model, one of your adapters ('name') or a version ('name@N')")
    if "\x00" in model or len(model) > 200:
        raise InferenceError("model must be a printable name of at most 200 characters", code="invalid_value",
                             param="model")
    stream = _boolean(given, "stream", False)
    include_usage = False
    if "stream_options" in given:
        if not stream:
            raise InferenceError("stream_options is only allowed when stream is true", code="invalid_value",
                                 param="stream_options")
        include_usage = _stream_options(given["stream_options"])
    user = given.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("user", "must be a string")
    fields: dict[str, Any] = dict(
        kind=kind,
        model=model,
        max_tokens=_max_tokens(given),
        temperature=_number(given, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(given, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        seed=_seed(given),
        stop=_stop(given.get("stop")),
        stream=stream,
        include_usage=include_usage,
        user=user,
        presence_penalty=_number(given, "presence_penalty", 0.0, low=-2.0, high=2.0),
        frequency_penalty=_number(given, "frequency_penalty", 0.0, low=-2.0, high=2.0),
        logit_bias=_logit_bias(given.get("logit_bias", {})),
        n=_choices(given),
        guided_json=_response_format(given["response_format"]) if "response_format" in given else None,
    )
    if kind == CHAT:
        fields["logprobs"], fields["top_logprobs"] = _chat_logprobs(given)
        fields["messages"] = _messages(given.get("messages"))
        fields.update(_tool_fields(given, response_schema=fields["guided_json"]))
    else:
        fields["logprobs"], fields["top_logprobs"] = _completion_logprobs(given)
        fields["prompt"] = _prompt(given.get("prompt"))
    return CompletionParams(**fields)


def _refuse_unsupported(body: dict[str, Any], kind: str) -> None:
    for name, value in body.items():
        if name in ACCEPTED[kind] or value is None:
            continue
        if name in NEUTRAL and value == NEUTRAL[name] and isinstance(value, bool) == isinstance(NEUTRAL[name], bool):
            continue
        raise InferenceError(f"the parameter '{name}' is not supported by this server; remove it",
                             code="unsupported_parameter", param=name)


def _missing(param: str, fix: str) -> InferenceError:
    return InferenceError(f"'{param}' is required: {fix}", code="missing_required_parameter", param=param)


def _invalid(param: str, problem: str) -> InferenceError:
    return InferenceError(f"'{param}' {problem}", code="invalid_value", param=param)


def _boolean(given: dict[str, Any], name: str, default: bool) -> bool:
    value = given.get(name, default)
    if not isinstance(value, bool):
        raise _invalid(name, f"must be true or false, got {value!r}")
    return value


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(given: dict[str, Any], name: str, default: float, *, low: float, high: float,
            low_open: bool = False) -> float:
    value = given.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, f"must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bounds = f"{'greater than' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise _invalid(name, f"must be {bounds}, got {value!r}")
    return float(value)


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's map of token ids (as JSON object keys, strings) to biases from -100 to 100. Whether an id lies
    in the model's vocabulary the engine checks, which knows it."""
    if not isinstance(value, dict):
        raise _invalid("logit_bias", f"must be an object mapping token ids to biases, got {value!r}")
    if len(value) > MAX_LOGIT_BIAS:
        raise _invalid("logit_bias", f"may bias at most {MAX_LOGIT_BIAS} tokens, got {len(value)}")
    bias = {}
    for key, number in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise _invalid("logit_bias", f"keys must be token ids (non-negative integers as strings), got {key!r}")
        if isinstance(number, bool) or not isinstance(number, int | float) or not -100 <= number <= 100:
            raise _invalid("logit_bias", f"biases must be numbers from -100 to 100, got {number!r} for token {key}")
        bias[int(key)] = float(number)
    return bias


def _max_tokens(given: dict[str, Any]) -> int:
    names = [name for name in ("max_completion_tokens", "max_tokens") if name in given]
    if len(names) == 2 and given["max_tokens"] != given["max_completion_tokens"]:
        raise _invalid("max_tokens", "and 'max_completion_tokens' disagree; send only max_completion_tokens")
    if not names:
        return settings.LORAFLEET_DEFAULT_MAX_TOKENS
    value = given[names[0]]
    if not _integer(value) or value < 1:
        raise _invalid(names[0], f"must be a positive integer, got {value!r}")
    return value


def _seed(given: dict[str, Any]) -> int | None:
    value = given.get("seed")
    if value is not None and (not _integer(value) or not 0 <= value <= MAX_SEED):
        raise _invalid("seed", f"must be an integer from 0 to {MAX_SEED}, got {value!r}")
    return value


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    return list(stops)


def _choices(given: dict[str, Any]) -> int:
    n = given.get("n", 1)
    if not _integer(n) or n < 1:
        raise _invalid("n", f"must be a positive integer, got {n!r}")
    if n > MAX_CHOICES:
        raise _invalid("n", f"may ask for at most {MAX_CHOICES} choices, got {n}; send several requests for more")
    return n


def _chat_logprobs(given: dict[str, Any]) -> tuple[bool, int]:
    logprobs = _boolean(given, "logprobs", False)
    top = given.get("top_logprobs", 0)
    if not _integer(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise _invalid("top_logprobs", f"must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    if top and not logprobs:
        raise _invalid("top_logprobs", "needs 'logprobs': true; set it, or remove top_logprobs")
    return logprobs, top


def _completion_logprobs(given: dict[str, Any]) -> tuple[bool, int]:
    """/v1/completions' ``logprobs: k``: each token's logprob and the k most likely at its position."""
    k = given.get("logprobs", False)
    if k is False:
        return False, 0
    if not _integer(k) or not 0 <= k <= MAX_COMPLETION_LOGPROBS:
        raise _invalid("logprobs", f"must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} (the most likely tokens "
                                   f"to list at each position), got {k!r}")
    return True, k


def _response_format(value: Any) -> dict[str, Any] | None:
    """The schema ``response_format`` puts on the output: none for text, any object for json_object."""
    kinds = "'text', 'json_object' or 'json_schema'"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _invalid("response_format", f'must be an object like {{"type": "json_object"}}, with type {kinds}')
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return dict(JSON_OBJECT_SCHEMA)
    if value["type"] != "json_schema":
        raise _invalid("response_format", f"has type {value['type']!r}; use {kinds}")
    spec = value.get("json_schema")
    if spec is None:
        raise _missing("response_format.json_schema", 'send {"name": ..., "schema": {...}} with type json_schema')
    if not isinstance(spec, dict):
        raise _invalid("response_format.json_schema", 'must be an object like {"name": ..., "schema": {...}}')
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise _invalid("response_format.json_schema.name",
                       f"must be 1 to 64 letters, digits, underscores or dashes, got {name!r}")
    _optional(spec, "description", str, "response_format.json_schema")
    _optional(spec, "strict", bool, "response_format.json_schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _invalid("response_format.json_schema.schema", f"must be a JSON schema (an object), got {schema!r}")
    return _enforceable(schema, "response_format")


def _tool_fields(given: dict[str, Any], *, response_schema: dict[str, Any] | None) -> dict[str, Any]:
    """tools, tool_choice, and for a forced call ("required", a named function) the schema of that call."""
    parallel = _boolean(given, "parallel_tool_calls", True)
    if "tools" not in given:
        if "tool_choice" in given:
            raise _invalid("tool_choice", "is only allowed when 'tools' are given; add the tools or remove it")
        return {}
    tools = _tools(given["tools"])
    choice = _tool_choice(given.get("tool_choice", "auto"), tools)
    if choice == "none":  # the model is told of no tools, and its answer is text
        return {}
    if response_schema is not None:
        raise _invalid("response_format", "cannot shape the answer while the model may call tools: a call is JSON "
                                          "of its own; drop response_format, or set tool_choice to 'none'")
    fields: dict[str, Any] = {"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}
    if choice != "auto":
        fields["guided_json"] = _enforceable(tool_calls.tool_call_schema(tools, choice), "tools")
    return fields


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _invalid("tools", 'must be a non-empty list of {"type": "function", "function": {"name", "parameters"}}')
    if len(value) > MAX_TOOLS:
        raise _invalid("tools", f"may hold at most {MAX_TOOLS} tools, got {len(value)}")
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InferenceError(f"'{param}' must be a function tool, {{\"type\": \"function\", \"function\": {{...}}}}"
                                 f"; type {kind!r} is not supported",
                                 code="unsupported_parameter" if isinstance(kind, str) else "invalid_value", param=param)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{param}.function", 'must be an object like {"name": ..., "parameters": {...}}')
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise _invalid(f"{param}.function.name", f"must be 1 to 64 letters, digits, underscores or dashes, got {name!r}")
        if any(t["function"]["name"] == name for t in tools):
            raise _invalid(f"{param}.function.name", f"{name!r} names two tools; give each its own name")
        declared: dict[str, Any] = {"name": name}
        for key, kind_of in (("description", str), ("strict", bool)):
            if _optional(function, key, kind_of, f"{param}.function"):
                declared[key] = function[key]
        if function.get("parameters") is not None:
            declared["parameters"] = _parameters(function["parameters"], f"{param}.function.parameters")
        tools.append({"type": "function", "function": declared})
    return tools


def _parameters(schema: Any, param: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise _invalid(param, f"must be a JSON schema (an object), got {schema!r}")
    if schema.get("type", "object") != "object":
        raise _invalid(param, f"must describe an object (a call's arguments are one), not type {schema['type']!r}")
    return _enforceable(schema, param)


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    forms = f'one of {list(TOOL_CHOICES)} or {{"type": "function", "function": {{"name": ...}}}}'
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise _invalid("tool_choice", f"must be {forms}, got {value!r}")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or value.get("type") != "function":
        raise _invalid("tool_choice", f"must be {forms}, got {value!r}")
    name = function.get("name")
    if not isinstance(name, str) or all(t["function"]["name"] != name for t in tools):
        raise _invalid("tool_choice", f"names the function {name!r}, which is not among the tools; declare it in "
                                      "'tools' or name one that is")
    return {"type": "function", "function": {"name": name}}


def _enforceable(schema: dict[str, Any], param: str) -> dict[str, Any]:
    """``schema`` if the engine's grammar library can enforce it, else a 400 naming what it cannot."""
    try:
        check_json_schema(schema)
    except GrammarError as exc:
        raise _invalid(param, f"holds a JSON schema this server cannot enforce: {exc}; change the schema") from None
    return schema


def _optional(given: dict[str, Any], name: str, kind: type, param: str) -> bool:
    """Whether ``given`` holds ``name``; a 400 if it holds another type than ``kind``."""
    if given.get(name) is None:
        return False
    if not isinstance(given[name], kind):
        raise _invalid(f"{param}.{name}", f"must be a {'boolean' if kind is bool else 'string'}, got {given[name]!r}")
    return True


def _stream_options(value: Any) -> bool:
    if not isinstance(value, dict):
        raise _invalid("stream_options", "must be an object like {\"include_usage\": true}")
    for name in value:
        if name != "include_usage":
            raise InferenceError(f"stream_options.{name} is not supported by this server; remove it",
                                 code="unsupported_parameter", param=f"stream_options.{name}")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise _invalid("stream_options.include_usage", f"must be true or false, got {include!r}")
    return include


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise _missing("messages", "send a list of {\"role\", \"content\"} objects")
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(param, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InferenceError(f"'{param}.role' {role!r} is not supported; use one of {sorted(ROLES)}",
                                 code="invalid_value" if role in (None, "") else "unsupported_parameter",
                                 param=f"{param}.role")
        for name in ("function_call", "audio"):
            if message.get(name) is not None:
                raise InferenceError(f"'{param}.{name}' is not supported by this server",
                                     code="unsupported_parameter", param=f"{param}.{name}")
        if role == "tool":
            messages.append(_tool_result(message, param, answering=_calls_awaiting_results(messages)))
        elif message.get("tool_calls"):  # an empty list, which some clients send, calls nothing
            if role != "assistant":
                raise _invalid(f"{param}.tool_calls", "is only allowed on assistant messages")
            content = message.get("content")  # null beside calls, as OpenAI allows
            messages.append({"role": "assistant",
                             "content": "" if content is None else _content(content, f"{param}.content"),
                             "tool_calls": _tool_calls(message["tool_calls"], f"{param}.tool_calls")})
        else:
            messages.append({"role": ROLES[role], "content": _content(message.get("content"), f"{param}.content")})
    return messages


def _calls_awaiting_results(messages: list[dict[str, Any]]) -> set[str]:
    """The ids of the calls a tool message may answer now: those of the assistant message before the run of
    tool messages that ends the conversation so far (OpenAI's rule)."""
    before = len(messages)
    while before and messages[before - 1]["role"] == "tool":
        before -= 1
    if not before or "tool_calls" not in messages[before - 1]:
        return set()
    return {call["id"] for call in messages[before - 1]["tool_calls"]}


def _tool_result(message: dict[str, Any], param: str, *, answering: set[str]) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if call_id is None:
        raise _missing(f"{param}.tool_call_id", "name the call this result answers (its id in the assistant's "
                                                "tool_calls)")
    if not isinstance(call_id, str) or call_id not in answering:
        raise _invalid(f"{param}.tool_call_id", f"{call_id!r} answers no call of the assistant message before it; "
                                                "a tool message follows the assistant message whose tool_calls "
                                                "holds that id")
    return {"role": "tool", "tool_call_id": call_id, "content": _content(message.get("content"), f"{param}.content")}


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    shape = 'a list of {"id", "type": "function", "function": {"name", "arguments"}}'
    if not isinstance(value, list):
        raise _invalid(param, f"must be {shape}")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise _invalid(f"{param}[{j}]", f"must be a function call; {param} is {shape}")
        for name, field_value in (("id", call.get("id")), ("function.name", function.get("name")),
                                  ("function.arguments", function.get("arguments"))):
            if not isinstance(field_value, str) or (not field_value and name != "function.arguments"):
                raise _invalid(f"{param}[{j}].{name}", f"must be a string, got {field_value!r}")
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": function["name"], "arguments": function["arguments"]}})
    return calls


def _content(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InferenceError(f"'{param}' may only hold text parts; {kind!r} is not supported",
                                     code="unsupported_parameter", param=param)
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(param, "must be a string or a list of text parts")


def _prompt(value: Any) -> str:
    if value is None:
        raise _missing("prompt", "send the text to complete")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        raise InferenceError("only one prompt per request is supported; send several requests",
                             code="unsupported_parameter", param="prompt")
    if not isinstance(value, str):
        raise InferenceError("'prompt' must be a string (token ids are not supported)",
                             code="unsupported_parameter" if isinstance(value, list) else "invalid_value",
                             param="prompt")
    return value
