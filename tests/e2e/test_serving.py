"""The serving path end to end: the official openai client → the portal (uvicorn) → Redis → the engine daemon.

The reference for every answer is the offline ``Engine`` on the same model and adapters, greedy.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from engine_daemon import protocol
from engine_daemon.protocol import ControlEvent, DeltaEvent, DoneEvent, response_event_from_redis
from engine_daemon.sampling import SamplingParams
from portal.usage.models import Usage
from tests.e2e.conftest import ADAPTERS, TINY_MODEL
from tests.e2e.stack import Daemon, wait_for

MESSAGES = [{"role": "user", "content": "Ahoy matey, where be the treasure?"}]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def response_events(stack, request_id: str) -> list:
    return [response_event_from_redis(f) for _id, f in stack.redis.xrange(protocol.response_stream(request_id))]


def pending(stack, base_model: str = TINY_MODEL) -> int:
    streams = [protocol.request_stream(base_model, protocol.text_of(tenant))
               for tenant in stack.redis.hkeys(protocol.tenant_index(base_model))]
    return sum(stack.redis.xpending(stream, protocol.CONSUMER_GROUP)["pending"] for stream in streams)


def usage_of(request_id: str) -> Usage:

    return Usage.objects.select_related("adapter_version", "tenant").get(request_id=request_id)


def test_the_openai_client_gets_exactly_the_offline_engines_output(stack):
    client = stack.openai()
    engine = stack.offline_engine()
    prompt = "The quick brown fox"
    answers = {}
    for model in (TINY_MODEL, "parrot"):
        adapter = None if model == TINY_MODEL else "parrot"
        chat = engine.chat([MESSAGES], greedy(24), adapters=[adapter])[0]
        text = engine.generate([prompt], greedy(24), adapters=[adapter])[0]
        answers[model] = chat.text

        whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
        assert whole.model == (TINY_MODEL if adapter is None else "parrot@1")
        assert whole.choices[0].message.content == chat.text
        assert whole.choices[0].finish_reason == chat.finish_reason
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(chat.prompt_token_ids),
                                                                              len(chat.token_ids))
        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chat.token_ids)

        whole = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        assert whole.choices[0].text == text.text
        assert whole.usage.completion_tokens == len(text.token_ids)
        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text.text
        assert chunks[-1].choices[0].finish_reason == text.finish_reason

        record = usage_of(whole.id)
        assert record.status == "ok" and record.completion_tokens == len(text.token_ids)
        assert record.prompt_tokens == len(text.prompt_token_ids) and record.time_to_first_token > 0
        assert record.adapter == ("" if adapter is None else "parrot@1")
    assert answers[TINY_MODEL] != answers["parrot"]  # the adapter was applied
    assert pending(stack) == 0


def test_penalties_and_logit_bias_through_the_openai_client_match_the_offline_engine(stack):
    client = stack.openai()
    engine = stack.offline_engine()
    steer = {"presence_penalty": 1.5, "frequency_penalty": 0.8}
    plain = engine.chat([MESSAGES], greedy(24), adapters=["parrot"])[0]
    banned = plain.token_ids[0]
    want = engine.chat([MESSAGES], SamplingParams(max_tokens=24, temperature=0.0, logit_bias={banned: -100}, **steer),
                       adapters=["parrot"])[0]
    assert want.text != plain.text and banned not in want.token_ids
    whole = client.chat.completions.create(model="parrot", messages=MESSAGES, max_tokens=24, temperature=0,
                                           logit_bias={str(banned): -100}, **steer)
    assert whole.choices[0].message.content == want.text
    chunks = list(client.chat.completions.create(model="parrot", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 logit_bias={str(banned): -100}, stream=True, **steer))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    # A token outside the vocabulary: the engine refuses the request, and the client hears why.
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=4,
                                       logit_bias={"99999999": 5})
    assert pending(stack) == 0


def test_two_tenants_over_four_adapters_share_engine_steps(stack):
    engine = stack.offline_engine()
    names = list(ADAPTERS)
    prompts = {name: [f"{name} says ahoy", f"{name} counts to ten"] for name in names}
    expected = {name: [o.text for o in engine.generate(prompts[name], greedy(256), adapters=[name, name])]
                for name in names}
    before = stack.daemon.heartbeat()

    async def ask(name: str, prompt: str, stream: bool) -> str:
        client = stack.async_openai(ADAPTERS[name][0])
        if not stream:
            reply = await client.completions.create(model=name, prompt=prompt, max_tokens=256, temperature=0)
            return reply.choices[0].text
        chunks = await client.completions.create(model=name, prompt=prompt, max_tokens=256, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in chunks])

    async def main() -> dict[str, list[str]]:
        jobs = {name: [ask(name, prompts[name][0], True), ask(name, prompts[name][1], False)] for name in names}
        flat = await asyncio.gather(*(job for name in names for job in jobs[name]))
        return {name: flat[2 * i: 2 * i + 2] for i, name in enumerate(names)}

    assert asyncio.run(main()) == expected
    after = wait_for(lambda: (beat := stack.daemon.heartbeat()) and beat.updated > time.time() - 0.5 and beat,
                     "a fresh heartbeat", 10)
    print(f"\nheartbeat: max_adapters_in_step={after.max_adapters_in_step} "
          f"multi_adapter_steps={after.multi_adapter_steps - before.multi_adapter_steps} "
          f"(of {after.steps - before.steps} steps)")
    assert after.max_adapters_in_step >= 2
    assert after.multi_adapter_steps > before.multi_adapter_steps

    for slug, own in (("tenant-a", {"parrot@1", "pelican@1"}), ("tenant-b", {"kraken@1", "narwhal@1"})):
        with stack.rest(slug) as rest:
            groups = rest.get("/usage", params={"group_by": "adapter"}).json()["groups"]
        adapters = {g["group"] for g in groups if g["group"] != TINY_MODEL}
        assert adapters == own  # each tenant sees its own adapters' usage only
        for group in groups:
            if group["group"] in own:
                assert group["requests"] >= 2 and group["statuses"].get("ok", 0) >= 2
    assert pending(stack) == 0


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks_at_once(stack):
    prompt = "Once upon a time"
    # Greedy on this prompt does not stop by itself for at least 1500 tokens: the request would run on.
    assert stack.offline_engine().generate([prompt], greedy(1500))[0].finish_reason == "length"
    client = stack.openai()
    stream = client.completions.create(model=TINY_MODEL, prompt=prompt, max_tokens=4000, temperature=0, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk.choices[0].text)
        if len(received) == 5:
            break
    first_at = time.time()
    busy = wait_for(lambda: (beat := stack.daemon.heartbeat()) and beat.updated > first_at and beat.running and beat,
                    "a heartbeat of the running request", 3)
    assert busy.kv_blocks_used > 0
    stream.close()  # hang up
    closed_at = time.time()
    request_id = chunk.id

    def ended():
        events = response_events(stack, request_id)
        return events and isinstance(events[-1], DoneEvent) and events

    events = wait_for(ended, "the engine ending the request", 10)
    assert events[-1].finish_reason == "cancelled"
    cancels = [(entry_id, ControlEvent.from_redis(f)) for entry_id, f in stack.redis.xrange(protocol.CONTROL_STREAM)]
    [cancel_id] = [entry_id for entry_id, e in cancels if e.action == "cancel" and e.request_id == request_id]
    cancel_ms = int(cancel_id.split(b"-")[0])
    delta_ms = [int(entry_id.split(b"-")[0]) for entry_id, f in stack.redis.xrange(protocol.response_stream(request_id))
                if isinstance(response_event_from_redis(f), DeltaEvent)]
    steps_after_cancel = sum(ms > cancel_ms for ms in delta_ms)
    print(f"\ndisconnect: cancel sent {cancel_ms / 1000 - closed_at:.3f} s after the client closed; "
          f"{steps_after_cancel} step(s) after it; {len(delta_ms)} of 4000 tokens generated; "
          f"kv blocks in use while streaming: {busy.kv_blocks_used}")
    assert cancel_ms / 1000 - closed_at < 1.0
    assert steps_after_cancel <= 2
    assert len(delta_ms) < 4000

    def freed():
        beat = stack.daemon.heartbeat()
        return beat and beat.updated > closed_at and beat.running == 0 and beat.kv_blocks_used == 0

    wait_for(freed, "the heartbeat showing the KV blocks free", 5)
    record = wait_for(lambda: _usage_or_none(request_id), "the usage record", 5)
    assert record.status == "cancelled" and record.stream and 5 <= record.completion_tokens < 4000
    assert pending(stack) == 0


def _usage_or_none(request_id: str) -> Usage | None:
    return Usage.objects.filter(request_id=request_id).first()


@pytest.mark.slow
def test_kill_9_mid_stream_then_a_restarted_daemon_finishes_every_request(stack):
    engine = stack.offline_engine()
    prompts = [f"Ahoy number {i}" for i in range(20)]
    expected = engine.generate(prompts, greedy(300))
    request_ids: list[str | None] = [None] * len(prompts)
    killed_at: list[float] = []

    async def one(i: int, client) -> tuple[str, str, int]:
        stream = await client.completions.create(model=TINY_MODEL, prompt=prompts[i], max_tokens=300, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        texts, finish, usage = [], None, None
        async for chunk in stream:
            request_ids[i] = chunk.id
            if chunk.choices:
                texts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage.completion_tokens
        return "".join(texts), finish, usage

    async def killer() -> None:
        while sum(bool(r and response_events(stack, r)) for r in request_ids) < 10:
            await asyncio.sleep(0.005)
        stack.daemon.kill()
        killed_at.append(time.time())
        assert pending(stack) > 0
        stack.daemon.start("--claim-idle-seconds", "1", engine_id="e2e-second")

    async def main():
        client = stack.async_openai(timeout=180)
        results, _ = await asyncio.gather(asyncio.gather(*(one(i, client) for i in range(len(prompts)))), killer())
        return results

    results = asyncio.run(main())
    print(f"\nkill -9: all 20 streams finished {time.time() - killed_at[0]:.1f} s after the kill")
    for request_id, (text, finish, completion_tokens), reference in zip(request_ids, results, expected, strict=True):
        entries = stack.redis.xrange(protocol.response_stream(request_id))
        deltas = [response_event_from_redis(f) for _entry_id, f in entries[:-1]]
        # every token exactly once, in order, across the two daemons; the portal relayed every text, once
        assert [t for d in deltas for t in d.token_ids] == reference.token_ids
        assert text == "".join(d.text for d in deltas) == reference.text
        assert (finish, completion_tokens) == (reference.finish_reason, len(reference.token_ids))
    records = [usage_of(request_id) for request_id in request_ids]
    assert [(r.status, r.completion_tokens) for r in records] == [("ok", len(e.token_ids)) for e in expected]
    wait_for(lambda: pending(stack) == 0, "XPENDING 0", 10)
    stack.daemon.wait_ready()


@pytest.mark.slow
def test_the_bundled_smollm2_through_the_openai_client(stack):
    from engine_daemon import Engine, EngineConfig

    smol = "smollm2-135m-instruct"
    kv_bytes = 64 * 1024 * 1024
    daemon = Daemon(model=smol, redis_url=stack.redis_url, cache_dir=stack.cache_dir, log_dir=stack.logs,
                    engine_id="e2e-smollm2")
    daemon.start("--kv-cache-bytes", str(kv_bytes))
    try:
        engine = Engine(EngineConfig(model=smol, device="cpu", dtype="float32", kv_cache_bytes=kv_bytes))
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        expected = engine.chat([messages], greedy(16))[0]
        daemon.wait_ready()
        client = stack.openai()
        # The portal has never heard of this model: the daemon's registration makes it known.
        whole = client.chat.completions.create(model=smol, messages=messages, max_tokens=16, temperature=0)
        assert whole.choices[0].message.content == expected.text
        assert whole.usage.prompt_tokens == len(expected.prompt_token_ids)
        chunks = list(client.chat.completions.create(model=smol, messages=messages, max_tokens=16, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
        assert "Paris" in expected.text
        assert smol in [m.id for m in client.models.list()]
        # Structured output and logprobs on the real model: what the offline engine gives, and valid.
        import json

        import jsonschema

        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "country": {"type": "string", "maxLength": 40}},
                  "required": ["city", "country"], "additionalProperties": False}
        ask = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]
        guided = engine.chat([ask], SamplingParams(max_tokens=40, temperature=0.0, guided_json=schema, logprobs=True))[0]
        reply = client.chat.completions.create(model=smol, messages=ask, max_tokens=40, temperature=0, logprobs=True,
                                               response_format={"type": "json_schema",
                                                                "json_schema": {"name": "capital", "schema": schema}})
        assert reply.choices[0].message.content == guided.text and reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(guided.text), schema)
        assert [e.logprob for e in reply.choices[0].logprobs.content] == pytest.approx(guided.logprobs, abs=1e-4)
    finally:
        assert daemon.stop() == 0
    assert pending(stack, smol) == 0
