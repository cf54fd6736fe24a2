"""The wire protocol: every message survives a trip through Redis field encoding; bad ones are refused."""

from __future__ import annotations

import json

import pytest

from engine_daemon import protocol
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    Heartbeat,
    InferenceRequest,
    ProtocolError,
    response_event_from_redis,
)


def as_redis_reply(fields: dict[str, str]) -> dict[bytes, bytes]:
    """What redis-py hands back for a stream entry: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in fields.items()}


REQUESTS = [
    InferenceRequest(request_id="r1", tenant_id="t", base_model="m", prompt="héllo 日本", sampling={"max_tokens": 3}),
    InferenceRequest(
        request_id="r2", tenant_id="t", base_model="m", messages=[{"role": "user", "content": "hi"}],
        adapter="bot@3", adapter_sha256="a" * 64, sampling={"temperature": 0.5, "stop": ["\n\n"], "seed": 7},
        deadline=1e9, created=1.5, key_id="k",
    ),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=["prompt", "chat"])
def test_requests_round_trip(request_):
    assert InferenceRequest.from_redis(as_redis_reply(request_.to_redis())) == request_
    assert request_.to_redis()["v"] == str(protocol.PROTOCOL_VERSION)


@pytest.mark.parametrize(
    "event",
    [
        DeltaEvent("Arr", [5, 6], [-0.1, -0.2]),
        DeltaEvent("", []),
        DoneEvent("length", 10, 3, 0.25, "e1"),
        DoneEvent("cancelled", 0, 0),
        ErrorEvent("context_length_exceeded", "too long"),
    ],
)
def test_response_events_round_trip(event):
    assert response_event_from_redis(as_redis_reply(event.to_redis())) == event


def test_control_events_and_heartbeats_round_trip():
    for action in protocol.CONTROL_ACTIONS:
        event = ControlEvent(action=action, sha256="b" * 64, request_id="r")
        assert ControlEvent.from_redis(as_redis_reply(event.to_redis())) == event
    beat = Heartbeat("e", "m", "cuda:0", "bfloat16", 1.0, 2.0, memory={"weights": 3}, adapters=[{"name": "x"}],
                     lora_share=0.05)
    assert Heartbeat.from_redis(as_redis_reply(beat.to_redis())) == beat


def test_stream_names_are_distinct_per_model_and_request():
    names = {protocol.request_stream("a", "1"), protocol.request_stream("b", "1"), protocol.request_stream("a", "2"),
             protocol.tenant_index("a"), protocol.dead_letter_stream("a"),
             protocol.response_stream("a"), protocol.heartbeat_key("a"), protocol.series_stream("a"),
             protocol.CONTROL_STREAM, protocol.ENGINES_KEY, protocol.BASE_MODELS_KEY}
    assert len(names) == 11


def test_enqueue_lists_the_tenant_with_its_weight_and_queues_on_its_stream(redis_client):
    request = InferenceRequest(request_id="r1", tenant_id="7", base_model="m", prompt="hi")
    pipe = redis_client.pipeline(transaction=True)
    protocol.enqueue_request(pipe, request, weight=2.5)
    pipe.execute()
    assert redis_client.hgetall(protocol.tenant_index("m")) == {b"7": b"2.5"}
    [(_id, fields)] = redis_client.xrange(protocol.request_stream("m", "7"))
    assert InferenceRequest.from_redis(fields) == request


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"v": "2", "type": "request", "body": "{}"}, "protocol version"),
        ({"v": "1", "type": "bogus", "body": "{}"}, "unknown message type"),
        ({"v": "1", "type": "request", "body": "{not json"}, "not JSON"),
        ({"v": "1", "type": "request", "body": "[]"}, "must be an object"),
        ({"v": "1", "type": "request", "body": json.dumps({"request_id": "r"})}, "lacks"),
    ],
)
def test_malformed_messages_are_refused(fields, message):
    with pytest.raises(ProtocolError, match=message):
        InferenceRequest.from_redis(fields)


def test_unknown_control_actions_and_bad_heartbeats_are_refused():
    with pytest.raises(ProtocolError, match="unknown control action"):
        ControlEvent(action="reboot")
    with pytest.raises(ProtocolError, match="heartbeat version"):
        Heartbeat.from_redis({"v": "0"})
    with pytest.raises(ProtocolError, match="malformed heartbeat"):
        Heartbeat.from_redis({"v": "1", "engine_id": "{"})
