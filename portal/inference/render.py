"""OpenAI's response shapes: completions, chunks of a stream, model lists. Pure functions of a Completion."""

from __future__ import annotations

import json
from typing import Any

from portal.inference.params import CHAT
from portal.inference.selectors import ModelEntry
from portal.inference.services import Completion


def usage_body(completion: Completion) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``, of the prompt tokens, are those the engine's prefix cache held."""
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": completion.cached_tokens},
    }


def completion_body(completion: Completion) -> dict[str, Any]:
    """``chat.completion`` or ``text_completion``, for a request that ran to its end."""
    if completion.kind == CHAT:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text, "refusal": None},
            "logprobs": None,
            "finish_reason": completion.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}
        kind = "text_completion"
    return {**_envelope(completion, kind), "choices": [choice], "usage": usage_body(completion)}


def chunk_body(completion: Completion, *, text: str | None = None, role: str | None = None,
               finish_reason: str | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` (or streamed ``text_completion``) with one choice."""
    if completion.kind == CHAT:
        delta: dict[str, Any] = {}
        if role is not None:
            delta["role"] = role
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    body = {**_envelope(completion, _chunk_kind(completion)), "choices": [choice]}
    if completion.params.include_usage:
        body["usage"] = None  # as OpenAI: every chunk says usage, and only the last one holds it
    return body


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
