"""Load on a real server: 64 concurrent streaming clients with random lengths, 10% of them disconnecting at a random
point. Every request completes or is aborted, nothing is logged as an error, all state slots and KV blocks are
free afterwards, and /metrics moved accordingly."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from server_fixtures import ErrorLog, ServerThread, chat_checkpoint, metric_value

MODEL = "tiny-chat"
CLIENTS = 64
WORDS = "the quick brown fox jumps over a lazy dog while mamba layers keep state and attention looks back".split()


@pytest.fixture(scope="module")
def server():
    s = ServerThread(chat_checkpoint(), max_num_seqs=16, max_model_len=512, max_waiting=256)
    yield s
    s.stop()


async def _one(client: httpx.AsyncClient, i: int, rng: random.Random, disconnect_after: int | None) -> dict:
    chat = i % 2 == 0
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    # those that will disconnect ask for more, so that they are still generating when they go
    max_tokens = rng.randint(4, 32) if disconnect_after is None else rng.randint(100, 200)
    if chat:
        url, body = "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    else:
        url, body = "/v1/completions", {"model": MODEL, "prompt": text}
    body.update(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                temperature=1.0, seed=i, ignore_eos=disconnect_after is not None)
    events, finish, usage = 0, None, None
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return {"done": True, "finish": finish, "usage": usage, "max_tokens": max_tokens}
            obj = json.loads(data)
            assert "error" not in obj, obj
            events += 1
            usage = obj.get("usage") or usage
            for ch in obj["choices"]:
                finish = ch.get("finish_reason") or finish
            if disconnect_after is not None and events >= disconnect_after:
                return {"done": False}  # leaving the block closes the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


async def _run_all(url: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    quitters = set(rng.sample(range(CLIENTS), CLIENTS // 10))
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=CLIENTS + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        jobs = [_one(client, i, random.Random(seed * 1000 + i), rng.randint(1, 6) if i in quitters else None)
                for i in range(CLIENTS)]
        return await asyncio.gather(*jobs)


def test_64_streaming_clients_some_disconnecting(server):
    before = httpx.get(server.url + "/metrics").text
    t0 = time.perf_counter()
    with ErrorLog() as errors:
        results = asyncio.run(_run_all(server.url, seed=7))
        server.assert_all_free()
    elapsed = time.perf_counter() - t0
    assert not errors.records, [r.getMessage() for r in errors.records]
    done = [r for r in results if r["done"]]
    assert len(results) == CLIENTS and len(done) == CLIENTS - CLIENTS // 10
    for r in done:
        assert r["finish"] in ("stop", "length")
        assert 1 <= r["usage"]["completion_tokens"] <= r["max_tokens"]
        if r["finish"] == "length":
            assert r["usage"]["completion_tokens"] == r["max_tokens"]
    assert elapsed < 60, elapsed

    after = httpx.get(server.url + "/metrics").text

    def moved(name, labels=None):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    # every engine request ended: finished normally or aborted by its client's disconnect
    finished = {reason: moved("hylm_requests_finished_total", {"reason": reason}) for reason in ("stop", "length")}
    aborted = moved("hylm_requests_finished_total", {"reason": "abort"})
    assert sum(finished.values()) + aborted == CLIENTS
    assert sum(finished.values()) >= len(done) and 1 <= aborted <= CLIENTS - len(done)
    generated = sum(r["usage"]["completion_tokens"] for r in done)
    assert moved("hylm_generation_tokens_total") >= generated
    assert moved("hylm_prompt_tokens_total") > 0
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        assert moved("hylm_http_requests_total", {"endpoint": endpoint, "status": "200"}) == CLIENTS // 2
    assert moved("hylm_time_to_first_token_seconds_count") == CLIENTS
    assert moved("hylm_inter_token_latency_seconds_count") >= generated - len(done)
    assert moved("hylm_request_duration_seconds_count", {"endpoint": "/v1/completions"}) == CLIENTS // 2
    # nothing holds a slot or a block now, and the gauges say so
    for name in ("hylm_state_slots_used", "hylm_kv_blocks_used", "hylm_num_requests_running",
                 "hylm_num_requests_waiting"):
        assert metric_value(after, name) == 0, name
    assert metric_value(after, "hylm_state_slots_total") == server.engine.sizes.num_slots
    assert metric_value(after, "hylm_kv_blocks_total") == server.engine.sizes.num_blocks


def test_metrics_move_while_serving(server):
    before = httpx.get(server.url + "/metrics").text
    assert "# TYPE hylm_time_to_first_token_seconds histogram" in before
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True,
                            "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        during = httpx.get(server.url + "/metrics").text
        assert metric_value(during, "hylm_num_requests_running") == 1
        assert metric_value(during, "hylm_state_slots_used") == 1
        assert metric_value(during, "hylm_kv_blocks_used") >= 1
    server.wait_idle()
    httpx.post(server.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    after = httpx.get(server.url + "/metrics").text
    assert metric_value(after, "hylm_http_requests_total", {"endpoint": "/v1/chat/completions", "status": "400"}) \
        > metric_value(before, "hylm_http_requests_total", {"endpoint": "/v1/chat/completions", "status": "400"})
    assert metric_value(after, "hylm_requests_finished_total", {"reason": "abort"}) == \
        metric_value(before, "hylm_requests_finished_total", {"reason": "abort"}) + 1
    assert metric_value(after, "hylm_generation_tokens_total") > metric_value(before, "hylm_generation_tokens_total")
    assert metric_value(after, "hylm_state_slots_used") == 0
    assert metric_value(after, "hylm_http_requests_total", {"endpoint": "/metrics", "status": "200"}) >= 2
