"""Bad input never crashes the server or leaks a slot: targeted cases (malformed JSON, wrong types, ranges,
empty / unknown things, invalid UTF-8, oversize bodies, API keys, a full queue) and a schemathesis run over the
server's own OpenAPI schema, all against a real server on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from server_fixtures import ErrorLog, ServerThread, chat_checkpoint

KEY = "sk-test-key"
LIMIT = 64 * 1024
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def server():
    s = ServerThread(chat_checkpoint(), api_key=KEY, max_body_bytes=LIMIT, max_num_seqs=4, max_model_len=256)
    with ErrorLog() as errors:
        yield s
    s.stop()
    assert not errors.records, [r.getMessage() for r in errors.records]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def chat_body(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **kw}


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err and "code" in err and "param" in err
    for w in words:
        assert w in err["message"], (w, err["message"])
    return err


# ---------------------------------------------------------------------------------------------- auth
def test_api_key(server, client):
    url = server.url + "/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
        r = httpx.post(url, json=chat_body(), headers=headers)
        err = assert_error(r, 401)
        assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    # open endpoints
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.get(server.url + "/openapi.json").status_code == 200
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------------------------- bodies
@pytest.mark.parametrize("raw", [
    b'{"messages": [', b"", b"null", b"[]", b'"hello"', b"42", b"{'single': 'quotes'}", b"\x00\x01",
    b'{"messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',  # invalid UTF-8
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -Infinity}',
    b"[" * 30_000 + b"]" * 30_000,  # too deep for the JSON parser
], ids=lambda raw: repr(raw[:24]))
def test_malformed_bodies(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400)


def test_body_must_be_json(client):
    r = client.post("/v1/chat/completions", content=json.dumps(chat_body()),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert_error(r, 400, "Content-Type: application/json")


def test_deeply_nested_values(client):
    deep = "[" * 950 + "]" * 950  # within the JSON parser's limit, deeper than the template code can recurse
    head = '"model": "tiny-chat", "max_tokens": 2'
    user = '{"role": "user", "content": "hi"}'
    for raw in (
        f'{{{head}, "messages": [{user}], "chat_template_kwargs": {{"x": {deep}}}}}',
        f'{{{head}, "messages": [{user}], "tools": [{{"type": "function", "function": {{"name": "f", '
        f'"parameters": {{"d": {deep}}}}}}}]}}',
        f'{{{head}, "messages": [{{"role": "assistant", "content": null, "tool_calls": [{{"type": "function", '
        f'"function": {{"name": "f", "arguments": {{"a": {deep}}}}}}}]}}, {user}]}}',
    ):
        json.loads(raw)  # the test's own JSON is well-formed
        r = client.post("/v1/chat/completions", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code in (200, 400), r.text


def test_lone_surrogates_and_control_characters(client):
    raw = b'{"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "surrogate")
    raw = b'{"model": "\\udc00", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}'
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "surrogate")
    raw = b'{"prompt": "x", "chat_template_kwargs": {"\\ud800": 1}}'
    assert_error(client.post("/tokenize", content=raw, headers={"Content-Type": "application/json"}), 400)
    r = client.post("/v1/completions", content=b'{"model": "tiny-chat", "prompt": "\\ud800", "max_tokens": 2}',
                    headers={"Content-Type": "application/json"})
    assert_error(r, 400, "surrogate")
    r = client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "\x00\x07\u202e"}]))
    assert r.status_code == 200


@pytest.mark.parametrize("field,value", [
    ("messages", "hi"), ("messages", [{"role": "user", "content": 5}]), ("messages", [["user", "hi"]]),
    ("max_tokens", "5"), ("max_tokens", 2.5), ("max_tokens", True), ("temperature", "hot"), ("temperature", [1]),
    ("n", 1.5), ("stream", "yes"), ("stop", 5), ("stop", [1, 2]), ("seed", "7"), ("logprobs", "true"),
    ("tools", {"name": "f"}), ("tool_choice", "sometimes"), ("chat_template_kwargs", [1]),
    ("stream_options", {"include_usage": "yes"}), ("top_k", 1.5), ("stop_token_ids", ["1"]),
])
def test_wrong_types(client, field, value):
    """A value of the wrong JSON type is a 400 naming the field (no conversions: "5" is no integer)."""
    err = assert_error(client.post("/v1/chat/completions", json=chat_body(**{field: value})), 400)
    assert err["param"] and err["param"].split(".")[0] == field


@pytest.mark.parametrize("extra,words", [
    ({"max_tokens": -1}, ["max_tokens"]), ({"max_tokens": 0}, ["max_tokens"]),
    ({"max_tokens": 10**6}, ["maximum model length"]), ({"max_tokens": 10**40}, ["maximum model length"]),
    ({"max_completion_tokens": 0}, ["max_completion_tokens"]),
    ({"temperature": -0.5}, ["temperature"]), ({"top_p": 0}, ["top_p"]), ({"top_p": 1.5}, ["top_p"]),
    ({"n": 0}, ["n"]), ({"n": 17}, ["n"]), ({"presence_penalty": 3}, ["presence_penalty"]),
    ({"frequency_penalty": -2.5}, ["frequency_penalty"]), ({"top_k": -2}, ["top_k"]), ({"min_p": 2}, ["min_p"]),
    ({"repetition_penalty": 0}, ["repetition_penalty"]), ({"min_tokens": 5, "max_tokens": 2}, ["min_tokens"]),
    ({"stop": ""}, ["stop"]), ({"stop": ["a"] * 17}, ["stop"]), ({"stop_token_ids": [10**6]}, ["stop_token_ids"]),
    ({"stop_token_ids": [-1]}, ["stop_token_ids"]), ({"logprobs": True, "top_logprobs": 21}, ["top_logprobs"]),
    ({"top_logprobs": 2}, ["top_logprobs"]), ({"logit_bias": {"5": 10.0}}, ["logit_bias"]),
    ({"response_format": {"type": "json_object"}}, ["response_format"]),
    ({"messages": []}, ["messages"]), ({"messages": [{"role": "wizard", "content": "hi"}]}, ["role"]),
    ({"messages": [{"role": "user"}]}, ["content"]), ({"messages": [{"content": "hi"}]}, ["role"]),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, ["type"]),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, ["JSON"]),
    ({"tool_choice": "required"}, ["tools"]),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, ["tool_choice"]),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, ["name"]),
    ({"chat_template_kwargs": {"messages": []}}, ["messages"]),
    ({"chat_template_kwargs": {"reasoning_budget": -1}}, ["reasoning_budget"]),
    ({"chat_template_kwargs": {"reasoning_budget": "lots"}}, ["reasoning_budget"]),
    ({"reasoning_budget": -1}, ["reasoning_budget"]), ({"reasoning_effort": "extreme"}, ["reasoning_effort"]),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, ["maximum model length"]),
])
def test_invalid_chat_requests(client, extra, words):
    assert_error(client.post("/v1/chat/completions", json=chat_body(**extra)), 400, *words)


@pytest.mark.parametrize("extra,words", [
    ({"prompt": ""}, ["empty"]), ({"prompt": []}, ["empty"]), ({"prompt": [[]]}, ["empty"]),
    ({"prompt": [10**6]}, ["out of range"]), ({"prompt": [-5]}, ["out of range"]), ({"prompt": [1, "a"]}, ["prompt"]),
    ({"prompt": ["a", 1]}, ["prompt"]), ({"prompt": None}, ["prompt"]), ({"max_tokens": 0}, ["max_tokens"]),
    ({"max_tokens": 300}, ["maximum model length"]), ({"logprobs": 21}, ["logprobs"]),
    ({"suffix": "x"}, ["suffix"]), ({"best_of": 3}, ["best_of"]), ({"echo": True, "logprobs": 1}, ["echo"]),
    ({"prompt": ["a"] * 10, "n": 8}, ["choices"]),
])
def test_invalid_completion_requests(client, extra, words):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, **extra}
    assert_error(client.post("/v1/completions", json=body), 400, *words)


def test_unknown_model_and_paths(client):
    err = assert_error(client.post("/v1/chat/completions", json=chat_body(model="gpt-4o")), 404, "gpt-4o")
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert_error(client.get("/v1/models/nope"), 404)
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404)
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    # no model given: the default one
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_tokenize_detokenize_errors(client):
    assert_error(client.post("/tokenize", json={}), 400, "prompt or messages")
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), 400)
    assert_error(client.post("/tokenize", json={"messages": [{"role": "bot", "content": "b"}]}), 400)
    assert_error(client.post("/detokenize", json={"tokens": [-1]}), 400, "out of range")
    assert_error(client.post("/detokenize", json={"tokens": [10**30]}), 400)
    assert_error(client.post("/detokenize", json={"tokens": "abc"}), 400)
    r = client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) == len(r.json()["token_strs"])
    r2 = client.post("/detokenize", json={"tokens": r.json()["tokens"]})
    assert r2.json() == {"prompt": "hello world"}


def test_oversize_bodies(server, client):
    big = chat_body(messages=[{"role": "user", "content": "x" * (LIMIT + 10)}])
    err = assert_error(client.post("/v1/chat/completions", json=big), 413)
    assert err["code"] == "request_too_large"
    # no Content-Length: the body arrives chunked and is counted as it comes
    data = json.dumps(big).encode()

    def chunks():
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413)
    # a Content-Length that is no number is refused (sent by hand: HTTP clients refuse to)
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    # just under the limit is fine (and then too long for the model: 400, not 413)
    ok = chat_body(messages=[{"role": "user", "content": "x " * (LIMIT // 2 - 200)}])
    assert_error(client.post("/v1/chat/completions", json=ok), 400, "maximum model length")


def test_server_healthy_and_nothing_leaked(server, client):
    assert client.get("/health").status_code == 200
    server.assert_all_free()


# ---------------------------------------------------------------------------------------------- queue full
def test_queue_full_is_503_with_retry_after():
    s = ServerThread(chat_checkpoint(), max_num_seqs=1, max_waiting=1, max_model_len=1024)
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 900, "ignore_eos": True, "stream": True}
        streams, stop = [], threading.Event()

        def hold(i):
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
                streams.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

        holders = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
        holders[0].start()
        deadline = time.monotonic() + 30
        while not s.engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.01)
        holders[1].start()  # waits for the only slot: the queue is now full
        while not s.engine.scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
        err = assert_error(r, 503, "queue")
        assert r.headers["retry-after"] == "1" and err["code"] == "queue_full"
        r = httpx.post(s.url + "/v1/chat/completions", json={**chat_body(), "stream": True}, timeout=60)
        assert_error(r, 503)
        stop.set()  # both holders disconnect: their requests are aborted, slot and blocks freed
        for t in holders:
            t.join(60)
        s.assert_all_free()
        assert httpx.post(s.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- fuzzing
def _fuzz(server, examples: int, mode_names=("positive", "negative")):
    """Schemathesis cases from the server's own OpenAPI schema; none may get a 5xx. Generated bodies are steered
    towards the served model and small outputs (so that valid requests really run), and every ~5th keeps a
    random model name."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_dict(httpx.get(server.url + "/openapi.json").json())
    failures, counts = [], {}
    headers = {"Authorization": f"Bearer {KEY}"}
    for result in schema.get_all_operations():
        op = result.ok()
        for mode_name in mode_names:
            if mode_name == "negative" and op.method.upper() != "POST":
                continue  # a GET has no body to break (and its path parameter accepts any string)
            mode = getattr(schemathesis.GenerationMode, mode_name.upper())

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                body = case.body
                if isinstance(body, dict):
                    if hash(json.dumps(body, sort_keys=True, default=str)) % 5:
                        body["model"] = MODEL
                    for key, cap in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
                        v = body.get(key)
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap:
                            body[key] = cap
                        elif key in body and v is None and key != "n":
                            body[key] = cap
                r = case.call(base_url=server.url, headers=headers, timeout=60)
                counts[(op.path, r.status_code)] = counts.get((op.path, r.status_code), 0) + 1
                if r.status_code >= 500:
                    failures.append((op.method, op.path, r.status_code, r.text[:300], repr(body)[:500]))

            run()
    assert not failures, failures
    # the fuzzing reached the engine, not only the validator
    assert counts.get(("/v1/chat/completions", 200), 0) + counts.get(("/v1/completions", 200), 0) > 0, counts
    return counts


def test_schemathesis_small(server):
    _fuzz(server, examples=8)
    server.assert_all_free()


@pytest.mark.slow
def test_schemathesis_large(server):
    _fuzz(server, examples=150)
    server.assert_all_free()


def test_sse_lines_survive_unicode_line_separators():
    from hylm.server.serving import _sse

    line = _sse({"text": "a\u2028b\x85c\u2029d\re\nf"})
    assert line.endswith(b"\n\n") and len(line[:-2].decode().splitlines()) == 1
