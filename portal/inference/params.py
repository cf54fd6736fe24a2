"""The body of ``POST /v1/chat/completions`` and ``POST /v1/completions``, checked the way OpenAI checks it.

Every refusal is an ``InferenceError`` that names the parameter (``param``) and the fix. Parameters
this server does not implement are refused by name rather than ignored, except where the value
asks for nothing (``null``, ``n: 1``, ``logprobs: false``), which common clients send.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from engine_daemon.protocol import SamplingParams
from portal.inference.errors import InferenceError

CHAT = "chat"
COMPLETION = "completion"

_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user", "n",
           "presence_penalty", "frequency_penalty", "logit_bias"}
ACCEPTED = {CHAT: _COMMON | {"messages", "max_completion_tokens"}, COMPLETION: _COMMON | {"prompt"}}
# Values of parameters we do not implement that ask for nothing different from what we do.
NEUTRAL = {"logprobs": False, "echo": False}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 300  # tokens one request may bias, as OpenAI allows


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
    messages: list[dict[str, str]] | None = None  # chat: {"role", "content"} with text content
    prompt: str | None = None  # completion

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == CHAT else "prompt"

    def sampling(self) -> dict[str, Any]:
        """``InferenceRequest.sampling``: the engine's ``SamplingParams``, in its wire form."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=list(self.stop), presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, logit_bias=dict(self.logit_bias)).to_wire()

    def prompt_token_estimate(self) -> int:
        """A rough prompt size for admission (the engine owns the tokenizer): ~4 characters a token."""
        if self.messages is not None:
            return sum(4 + math.ceil(len(m["content"]) / 4) for m in self.messages)
        return math.ceil(len(self.prompt or "") / 4)


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
    n = given.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise InferenceError("only n=1 is supported; send several requests for several choices",
                             code="unsupported_parameter", param="n")
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
    )
    if kind == CHAT:
        fields["messages"] = _messages(given.get("messages"))
    else:
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


def _messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise _missing("messages", "send a list of {\"role\", \"content\"} objects")
    if not isinstance(value, list) or not value:
        raise _invalid("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(param, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InferenceError(f"'{param}.role' {role!r} is not supported; use one of {sorted(ROLES)}",
                                 code="invalid_value" if role in (None, "") else "unsupported_parameter",
                                 param=f"{param}.role")
        for name in ("tool_calls", "function_call", "audio"):
            if message.get(name) is not None:
                raise InferenceError(f"'{param}.{name}' is not supported by this server",
                                     code="unsupported_parameter", param=f"{param}.{name}")
        messages.append({"role": ROLES[role], "content": _content(message.get("content"), f"{param}.content")})
    return messages


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
