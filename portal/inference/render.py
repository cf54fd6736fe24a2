"""OpenAI's response shapes: completions, chunks of a stream, model lists. Pure functions of a Completion."""

from __future__ import annotations

import json
from typing import Any

from engine_daemon import tool_calls
from engine_daemon.protocol import DeltaEvent
from portal.inference.params import CHAT
from portal.inference.selectors import ModelEntry
from portal.inference.services import Choice, Completion


def usage_body(completion: Completion) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``, of the prompt tokens, are those the engine's prefix cache held."""
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": completion.cached_tokens},
    }


def completion_body(completion: Completion) -> dict[str, Any]:
    """``chat.completion`` or ``text_completion``, for a request that ran to its end: one choice per n."""
    if completion.kind == CHAT:
        choices = [_chat_choice(completion, choice) for choice in completion.choices]
        kind = "chat.completion"
    else:
        choices = [{"index": choice.index, "text": choice.text,
                    "logprobs": _logprobs(completion, choice.logprob_content), "finish_reason": choice.finish_reason}
                   for choice in completion.choices]
        kind = "text_completion"
    return {**_envelope(completion, kind), "choices": choices, "usage": usage_body(completion)}


def _chat_choice(completion: Completion, choice: Choice) -> dict[str, Any]:
    content, calls, finish_reason = _answer(completion, choice)
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return {"index": choice.index, "message": message, "logprobs": _logprobs(completion, choice.logprob_content),
            "finish_reason": finish_reason}


def _answer(completion: Completion, choice: Choice) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """(content, tool calls, finish reason) of a finished choice: with tools in play its text is read for calls."""
    if completion.params.tools is None:
        return choice.text, [], choice.finish_reason
    content, calls = tool_calls.parse_tool_calls(choice.text, completion.params.tools)
    if not completion.params.parallel_tool_calls:
        calls = calls[:1]  # the client asked for one call at a time: the first is answered, the rest dropped
    return content, calls, "tool_calls" if calls else choice.finish_reason


def _logprobs(completion: Completion, entries: list[dict[str, Any]] | None, text_offset: int = 0) -> Any:
    """A choice's (or a chunk's) logprobs: chat's ``{"content": [...]}``, or the legacy columns of
    /v1/completions, whose ``text_offset`` counts characters from the start of the choice's text."""
    if not completion.params.logprobs or entries is None:
        return None
    if completion.kind == CHAT:
        return {"content": entries, "refusal": None}
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry["token"])
    return {"tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top_logprobs"]} for entry in entries],
            "text_offset": offsets}


def chunk_body(completion: Completion, *, index: int = 0, text: str | None = None, role: str | None = None,
               tool_call_deltas: list[dict[str, Any]] | None = None, logprobs: list[dict[str, Any]] | None = None,
               text_offset: int = 0, finish_reason: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (or streamed ``text_completion``) for the choice ``index``."""
    if completion.kind == CHAT:
        delta: dict[str, Any] = {}
        if role is not None:
            delta["role"] = role
        if text is not None:
            delta["content"] = text
        if tool_call_deltas is not None:
            delta["tool_calls"] = tool_call_deltas
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": _logprobs(completion, logprobs),
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": _logprobs(completion, logprobs, text_offset),
                  "finish_reason": finish_reason}
    body = {**_envelope(completion, _chunk_kind(completion)), "choices": [choice]}
    if completion.params.include_usage:
        body["usage"] = None  # as OpenAI: every chunk says usage, and only the last one holds it
    return body


def delta_chunks(completion: Completion, event: DeltaEvent, *, text_offset: int) -> list[dict[str, Any]]:
    """The chunks of one delta: its text and logprobs, and when it ends its choice, that choice's end.

    With tools in play a choice's text is held back and sent at its end (``choice_end_chunks``): whether
    it is a call is known only once it is whole, so clients get each call whole, not argument by argument.
    """
    chunks = []
    if completion.params.tools is None and (event.text or event.logprob_content):
        chunks.append(chunk_body(completion, index=event.index, text=event.text, logprobs=event.logprob_content,
                                 text_offset=text_offset))
    if event.finish_reason is not None:
        chunks += choice_end_chunks(completion, completion.choices[event.index])
    return chunks


def choice_end_chunks(completion: Completion, choice: Choice) -> list[dict[str, Any]]:
    """The last chunks of a finished choice: what tools held back (its calls, or its text), its finish reason."""
    if completion.params.tools is None:
        return [chunk_body(completion, index=choice.index, finish_reason=choice.finish_reason)]
    content, calls, finish_reason = _answer(completion, choice)
    chunks = []
    if content:
        chunks.append(chunk_body(completion, index=choice.index, text=content))
    if calls:
        chunks.append(chunk_body(completion, index=choice.index,
                                 tool_call_deltas=[{"index": i, **call} for i, call in enumerate(calls)]))
    chunks.append(chunk_body(completion, index=choice.index, logprobs=choice.logprob_content,
                             finish_reason=finish_reason))
    return chunks


def usage_chunk_body(completion: Completion) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {**_envelope(completion, _chunk_kind(completion)), "choices": [], "usage": usage_body(completion)}


def sse_event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


def model_body(entry: ModelEntry) -> dict[str, Any]:
    return {"id": entry.id, "object": "model", "created": entry.created, "owned_by": entry.owned_by}


def model_list_body(entries: list[ModelEntry]) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(e) for e in entries]}


def _chunk_kind(completion: Completion) -> str:
    return "chat.completion.chunk" if completion.kind == CHAT else "text_completion"


def _envelope(completion: Completion, kind: str) -> dict[str, Any]:
    return {
        "id": completion.request_id,
        "object": kind,
        "created": int(completion.arrived),
        "model": completion.model_id,
        "system_fingerprint": None,
    }
