"""The official `openai` client against a real server on loopback: chat and completions, streaming and not, n > 1,
logprobs, stop strings, tools with a round trip, reasoning on / off and a budget, usage totals.

The tiny model writes random tokens, so semantics are checked two ways: greedy (or seeded) outputs must equal the
offline API's on the same checkpoint, and prompts containing `SCRIPT:<name>` make the server's engine write a
scripted answer (tool calls, reasoning) whose parse is known."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")

from hylm.engine.sampling_params import SamplingParams  # noqa: E402

from server_fixtures import SCRIPTS, TOOLS, ErrorLog, ServerThread, chat_checkpoint, greedy_offline  # noqa: E402

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def server():
    s = ServerThread(chat_checkpoint(), scripted=True, max_num_seqs=8, max_model_len=1024)
    with ErrorLog() as errors:
        yield s
        s.assert_all_free()
    s.stop()
    assert not errors.records, [r.getMessage() for r in errors.records]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def offline():
    return greedy_offline(chat_checkpoint())


def collect_chat(stream):
    """Reassemble a chat stream: per choice reasoning, content, tool calls, finish reason; and the usage."""
    choices, usage, roles = {}, None, {}
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for ch in chunk.choices:
            c = choices.setdefault(ch.index, {"reasoning": "", "content": "", "calls": {}, "finish": None,
                                              "logprobs": []})
            d = ch.delta
            if d.role:
                roles[ch.index] = d.role
            c["reasoning"] += getattr(d, "reasoning_content", None) or ""
            c["content"] += d.content or ""
            for tc in d.tool_calls or []:
                call = c["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert call["id"] is None and tc.type == "function"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            if ch.logprobs is not None and ch.logprobs.content:
                c["logprobs"] += ch.logprobs.content
            if ch.finish_reason is not None:
                assert c["finish"] is None
                c["finish"] = ch.finish_reason
    assert all(r == "assistant" for r in roles.values()) and set(roles) == set(choices)
    return choices, usage


# ---------------------------------------------------------------------------------------------- basics
def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_greedy_matches_offline_with_logprobs(client, offline):
    llm, fmt = offline
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, logprobs=True,
                                       top_logprobs=3)
    prompt = fmt.prompt(messages)
    ref = llm.generate(prompt.ids, SamplingParams(temperature=0, max_tokens=12, logprobs=3))[0].outputs[0]
    want = fmt.parse(prompt, ref.token_ids)
    msg = r.choices[0].message
    assert (msg.content, msg.reasoning_content) == (want.content, want.reasoning)
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(prompt.ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    lps = r.choices[0].logprobs.content
    assert len(lps) == len(ref.token_ids)
    tok = fmt.tokenizer
    for entry, t, lp, top in zip(lps, ref.token_ids, ref.logprobs, ref.top_logprobs):
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
        if t not in tok.special_ids and not entry.token.startswith("bytes:"):
            assert entry.token == tok.decode([t]) == bytes(entry.bytes).decode("utf-8")
    # all the bytes together are the output's text (byte-level tokens put back together)
    visible = [e for e, t in zip(lps, ref.token_ids) if t not in fmt.hidden_ids]
    assert b"".join(bytes(e.bytes) for e in visible).decode("utf-8", "replace") == \
        fmt.tokenizer.decode([t for t in ref.token_ids if t not in fmt.hidden_ids], skip_special_tokens=False)

    # the same, streamed
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            logprobs=True, top_logprobs=3, stream=True,
                                            stream_options={"include_usage": True})
    choices, usage = collect_chat(stream)
    c = choices[0]
    assert (c["content"] or None, c["reasoning"] or None) == (want.content, want.reasoning)
    assert c["finish"] == ref.finish_reason
    assert [e.logprob for e in c["logprobs"]] == pytest.approx([e.logprob for e in lps])
    assert usage.model_dump() == r.usage.model_dump()


def test_completions_match_offline_streaming_and_stop(client, offline):
    llm, fmt = offline
    prompt = "The quick brown fox"
    ids = fmt.tokenizer.encode(prompt)
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 16)
    # streamed pieces add up to the same text
    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.text)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == ref.text and finish == "length" and usage.completion_tokens == 16
    # a stop string taken from the middle of the greedy text: the text ends right before it
    text = ref.text
    cut = next(i for i in range(len(text) // 2, len(text)) if text[i].isprintable() and not text[i].isspace())
    stop = text[cut:cut + 2]
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want[0].outputs[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.text for chunk in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stop=stop, stream=True,
        extra_body={"ignore_eos": True}) for ch in chunk.choices)
    assert streamed == r.choices[0].text
    # token-id prompts, several prompts, echo and logprobs
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], temperature=0, max_tokens=3, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == len(ids) + 2
    assert len(r.choices[0].logprobs.tokens) == 3 and all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text.startswith(prompt)


def test_n_samples_are_seeded_like_offline(client, offline):
    llm, fmt = offline
    prompt = "Mamba layers keep"
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    ref = [o.text for o in llm.generate(prompt, params)[0].outputs]
    r = client.completions.create(model=MODEL, prompt=prompt, n=3, temperature=1.0, seed=1234, max_tokens=8,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == ref
    assert len(set(ref)) > 1 and r.usage.completion_tokens == 24
    # chat, streamed: every choice arrives, with its own finish reason, and the usage sums them
    messages = [{"role": "user", "content": "hello"}]
    prompt_ids = fmt.prompt(messages).ids
    stream = client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=5, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    choices, usage = collect_chat(stream)
    assert sorted(choices) == [0, 1] and all(c["finish"] in ("stop", "length") for c in choices.values())
    ref = llm.generate(prompt_ids, SamplingParams(n=2, seed=5, max_tokens=6))[0].outputs
    for k, out in enumerate(ref):
        want = fmt.parse(fmt.prompt(messages), out.token_ids)
        assert (choices[k]["reasoning"] or None, choices[k]["content"] or None) == (want.reasoning, want.content)
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == sum(len(o.token_ids) for o in ref)
    r = client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=5, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == usage.completion_tokens


# ---------------------------------------------------------------------------------------------- tools
def _as_dict(message) -> dict:
    """What the client sends for a message object it got back (extra fields included)."""
    return message.model_dump(exclude_none=True)


def test_tool_call_round_trip(client, offline):
    _, fmt = offline
    messages = [{"role": "user", "content": "What is the weather in Paris? SCRIPT:tool"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.reasoning_content == SCRIPTS["tool"][0] and msg.content is None
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert r.usage.prompt_tokens == len(fmt.prompt(messages, TOOLS).ids)

    # streamed: the call comes as a start (id, name) and argument pieces that add up to the same JSON
    choices, usage = collect_chat(client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, stream=True, stream_options={"include_usage": True}))
    c = choices[0]
    assert c["finish"] == "tool_calls" and c["reasoning"] == SCRIPTS["tool"][0] and c["content"] == ""
    assert [(v["name"], json.loads(v["arguments"])) for v in c["calls"].values()] == \
        [("get_weather", {"city": "Paris", "days": 3})]
    assert usage.completion_tokens == r.usage.completion_tokens

    # the round trip: the assistant message as received, then the tool's answer
    messages2 = messages + [msg, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C SCRIPT:answer"}]
    r2 = client.chat.completions.create(model=MODEL, messages=messages2, tools=TOOLS)
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == SCRIPTS["answer"][1]
    assert r2.choices[0].message.reasoning_content == SCRIPTS["answer"][0]
    sent = messages + [_as_dict(msg), messages2[-1]]
    rendered = fmt.prompt(sent, TOOLS)
    assert r2.usage.prompt_tokens == len(rendered.ids)
    assert "<tool_call>\n<function=get_weather>" in rendered.text and "<tool_response>\nsunny" in rendered.text


def test_tool_choice(client, offline):
    _, fmt = offline
    messages = [{"role": "user", "content": "Weather? SCRIPT:tool"}]
    # none: the tools are not offered and the call text stays content
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "<tool_call>" in r.choices[0].message.content
    assert r.usage.prompt_tokens == len(fmt.prompt(messages).ids)
    # named: only that tool is offered (with an instruction to call it)
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[other] + TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    note = [{"role": "system", "content": "You must call the function get_weather."}]
    assert r.usage.prompt_tokens == len(fmt.prompt(note + messages, TOOLS).ids)
    # auto and required also parse the call
    for choice in ("auto", "required"):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=choice)
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


# ---------------------------------------------------------------------------------------------- reasoning
def test_reasoning_on_off_and_budget(client, offline):
    _, fmt = offline
    messages = [{"role": "user", "content": "Is it sunny? SCRIPT:answer"}]
    reasoning, content = SCRIPTS["answer"]
    r = client.chat.completions.create(model=MODEL, messages=messages)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, content)
    # thinking off, via the template's switch or reasoning_effort="none"
    off = fmt.prompt(messages, enable_thinking=False)
    for kw in ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, {"reasoning_effort": "none"}):
        r = client.chat.completions.create(model=MODEL, messages=messages, **kw)
        msg = r.choices[0].message
        assert msg.content == content and getattr(msg, "reasoning_content", None) is None
        assert r.usage.prompt_tokens == len(off.ids)
    # low effort reaches the template
    r = client.chat.completions.create(model=MODEL, messages=messages, reasoning_effort="low")
    assert r.usage.prompt_tokens == len(fmt.prompt(messages, low_effort=True).ids)

    # a reasoning budget ends a long reasoning at the first line end after the budget; the answer follows
    long = [{"role": "user", "content": "Think hard. SCRIPT:long"}]
    full = client.chat.completions.create(model=MODEL, messages=long)
    assert full.choices[0].message.reasoning_content == SCRIPTS["long"][0]
    for extra in ({"reasoning_budget": 10}, {"chat_template_kwargs": {"reasoning_budget": 10}}):
        r = client.chat.completions.create(model=MODEL, messages=long, extra_body=extra)
        msg = r.choices[0].message
        assert msg.content == SCRIPTS["long"][1] and r.choices[0].finish_reason == "stop"
        n = len(fmt.tokenizer.encode(msg.reasoning_content))
        assert 10 <= n <= 10 + 12 and SCRIPTS["long"][0].startswith(msg.reasoning_content)
        assert msg.reasoning_content.count("\n") < 3
        # the budget is also stated in the prompt (as the template writes it)
        assert r.usage.prompt_tokens == len(fmt.prompt(long, reasoning_budget=10).ids)
    streamed, _ = collect_chat(client.chat.completions.create(model=MODEL, messages=long, stream=True,
                                                              extra_body={"reasoning_budget": 10}))
    assert (streamed[0]["reasoning"], streamed[0]["content"]) == (msg.reasoning_content, msg.content)


def test_chat_stop_string(client, offline):
    llm, fmt = offline
    messages = [{"role": "user", "content": "Say something"}]
    prompt = fmt.prompt(messages, enable_thinking=False)
    ref = llm.generate(prompt.ids, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    content = fmt.parse(prompt, ref.token_ids).content
    cut = next(i for i in range(len(content) // 2, len(content)) if content[i].isalnum())
    stop = content[cut:cut + 2]
    kw = dict(model=MODEL, messages=messages, temperature=0, max_tokens=20, stop=[stop],
              extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    r = client.chat.completions.create(**kw)
    got = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and stop not in got
    assert content.startswith(got) and len(got) >= content.index(stop) - 2
    choices, _ = collect_chat(client.chat.completions.create(stream=True, **kw))
    assert choices[0]["content"] == got and choices[0]["finish"] == "stop"
