"""The wire protocol: every message survives a trip through Redis field encoding; bad ones are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest

import engine_daemon
from engine_daemon import protocol, sampling
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    DoneEvent,
    EngineSnapshot,
    ErrorEvent,
    Heartbeat,
    InferenceRequest,
    ProtocolError,
    SamplingParams,
    UsageEvent,
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
        DoneEvent("stop", 40, 3, 0.1, "e1", cached_tokens=32),
        DoneEvent("cancelled", 0, 0),
        ErrorEvent("context_length_exceeded", "too long"),
    ],
)
def test_response_events_round_trip(event):
    assert response_event_from_redis(as_redis_reply(event.to_redis())) == event


def test_a_done_event_from_before_cached_tokens_reads_as_none_cached():
    old = {"v": "1", "type": "done", "body": json.dumps({"finish_reason": "stop", "prompt_tokens": 9,
                                                         "completion_tokens": 2})}
    assert response_event_from_redis(as_redis_reply(old)) == DoneEvent("stop", 9, 2)


def test_usage_events_carry_the_cached_tokens():
    request = REQUESTS[1]
    usage = UsageEvent.for_request(request, end=UsageEvent.CANCELLED, prompt_tokens=40, completion_tokens=2,
                                   cached_tokens=32, engine_id="e1", admission=4)
    read = UsageEvent.from_redis(as_redis_reply(usage.to_redis()))
    assert read == usage and (read.prompt_tokens, read.cached_tokens) == (40, 32)


def test_control_events_and_heartbeats_round_trip():
    for action in protocol.CONTROL_ACTIONS:
        event = ControlEvent(action=action, sha256="b" * 64, request_id="r")
        assert ControlEvent.from_redis(as_redis_reply(event.to_redis())) == event
    beat = Heartbeat(engine_id="e", base_model="m", device="cuda:0", dtype="bfloat16", started=1.0, updated=2.0,
                     memory={"weights": 3}, adapters=[{"name": "x"}], lora_share=0.05)
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


def test_one_sampling_schema_serves_the_portal_the_wire_and_the_engine():
    assert sampling.SamplingParams is engine_daemon.SamplingParams is SamplingParams
    params = SamplingParams(max_tokens=5, temperature=0.0, top_k=3, seed=7, stop="\n", stop_token_ids=[2], logprobs=True)
    request = InferenceRequest(request_id="r", tenant_id="t", base_model="m", prompt="hi", sampling=params.to_wire())
    assert InferenceRequest.from_redis(as_redis_reply(request.to_redis())).sampling_params() == params
    assert params.stop == ["\n"] and SamplingParams.from_wire({}) == SamplingParams()


@pytest.mark.parametrize(
    "sampling, message",
    [
        ({"max_tokens": 4, "temprature": 0.5}, r"unknown sampling parameters \['temprature'\]"),
        ({"max_tokens": "4"}, "max_tokens must be int, got '4'"),
        ({"seed": True}, r"seed must be int \| None, got True"),
        ({"stop": ["ok", 3]}, r"stop must be list\[str\]"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"seed": 2**64}, "seed must be in"),
        ([1, 2], "sampling must be an object"),
    ],
)
def test_bad_sampling_parameters_are_a_protocol_error_that_names_them(sampling, message):
    request = InferenceRequest(request_id="r", tenant_id="t", base_model="m", prompt="hi", sampling=sampling)
    with pytest.raises(ProtocolError, match=message):
        request.sampling_params()


def test_the_heartbeat_carries_the_engine_snapshot_through_redis():
    snapshot = EngineSnapshot(base_model="m", device="cuda:0", dtype="bfloat16", lora_dtype="float16", started=1.0,
                              memory={"total": 9, "weights": 3}, kv_blocks_total=10, kv_blocks_used=4, running=2,
                              waiting=1, steps=5, prompt_tokens=40, generated_tokens=9, preemptions=1,
                              tokens_per_second=2.5, step_seconds=0.01, lora_share=0.2, max_adapters_in_step=2,
                              multi_adapter_steps=3, adapters=[{"name": "x", "tier": "gpu"}], prefix_caching=True,
                              prefix_cache_blocks=6, prefix_prompt_tokens=120, prefix_cached_tokens=48,
                              prefix_tenants={"7": [100, 48], "8": [20, 0]})
    beat = Heartbeat.of(snapshot, engine_id="e", updated=2.0, in_flight=3, draining=True, metrics_url="http://m")
    read = Heartbeat.from_redis(as_redis_reply(beat.to_redis()))
    assert read == beat and isinstance(read, EngineSnapshot)
    assert read.prefix_tenants == {"7": [100, 48], "8": [20, 0]} and read.prefix_hit_rate == 0.4
    assert {f.name: getattr(read, f.name) for f in dataclasses.fields(EngineSnapshot)} == vars(snapshot)
    daemon_only = {f.name for f in dataclasses.fields(Heartbeat)} - {f.name for f in dataclasses.fields(EngineSnapshot)}
    assert daemon_only == {"engine_id", "updated", "in_flight", "draining", "metrics_url"}


def test_a_heartbeat_from_before_the_prefix_cache_reads_as_caching_off():
    beat = Heartbeat(engine_id="e", base_model="m", device="cpu", dtype="float32", started=1.0, updated=2.0)
    fields = {k: v for k, v in beat.to_redis().items() if not k.startswith("prefix_")}
    read = Heartbeat.from_redis(as_redis_reply(fields))
    assert (read.prefix_caching, read.prefix_cache_blocks, read.prefix_tenants) == (False, 0, {})
    assert read.prefix_hit_rate is None  # no prompt yet: no rate, rather than 0%
