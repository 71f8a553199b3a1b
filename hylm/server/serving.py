"""Chat and completion requests: OpenAI request -> prompt ids + SamplingParams -> engine requests -> response.

One API request with `n` samples (and, for completions, several prompts) becomes one engine request per
choice, with ids `<request id>-<choice>` and seeds `seed + choice` (as the offline `LLM` does). All of them are
admitted before anything is sent back, so a bad request (400) or a full queue (503) is an HTTP error, never a
broken stream. Then outputs are merged in arrival order and turned into

* chat: `ChatStream` deltas (reasoning, content, tool-call events) -> `chat.completion.chunk` SSE events, or one
  `chat.completion`;
* completions: text (the offline API's `_TextTracker`: held-back stop strings) -> `text_completion` events or
  one response.

Stop strings are matched in text above the engine: on a match the engine is told to finish the request
(`AsyncEngine.finish`, reason "stop"). For chat they are matched in the raw output text (reasoning, the
`</think>` tag and content as generated), between the detokenizer and the reasoning parser.

When the client goes away (stream or not), the merged generation is closed: every engine request still running
is aborted at once, freeing its slot and KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..chat.chat_format import ChatDelta, ChatPrompt
from ..chat.tool_calls import ToolCallArgumentsDelta, ToolCallStart
from ..detokenize import StopStrings
from ..engine.async_engine import AsyncEngine, EngineStopped
from ..engine.llm import _TextTracker
from ..engine.request import RequestOutput
from ..engine.sampling_params import SamplingParams
from .errors import APIError, error_body
from .protocol import (MAX_CHOICES, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       NamedToolChoice, TokenizeRequest, ToolDef, _Sampling)
from .state import ServerState

LOGPROB_FLOOR = -9999.0  # what a -inf logprob is reported as (JSON has no infinities)
_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


# ---------------------------------------------------------------------------------------------- helpers
def resolve_model(state: ServerState, name: str | None) -> str:
    if name is None:
        return state.model_names[0]
    if name not in state.model_names:
        raise APIError(404, f"The model {name!r} does not exist (served: {', '.join(state.model_names)})",
                       param="model", code="model_not_found")
    return name


def _finite(x: float | None) -> float:
    if x is None or math.isnan(x):
        return LOGPROB_FLOOR
    return max(float(x), LOGPROB_FLOOR)


def _sse(obj: Any) -> bytes:
    # ASCII-escaped: generated text may hold U+2028, U+0085 and the like, which clients that split
    # lines the Unicode way (httpx's aiter_lines, Python's splitlines) would take for line ends
    return b"data: " + json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sampling_params(state: ServerState, req: _Sampling, *, max_tokens: int | None, logprobs: int | None,
                     thinking_budget=None) -> SamplingParams:
    """OpenAI / vLLM fields -> SamplingParams (which validates them: ValueError -> 400)."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_ids = list(req.stop_token_ids or [])
    bad = [t for t in stop_ids if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"stop_token_ids out of range [0, {state.vocab_size}): {bad[:5]}", param="stop_token_ids")
    return SamplingParams(
        n=1, max_tokens=max_tokens, min_tokens=req.min_tokens or 0,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
        min_p=req.min_p or 0.0, repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed, stop=stop, stop_token_ids=stop_ids, ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
        thinking_budget=thinking_budget)


def _per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The n samples of one prompt draw from seeds seed, seed+1, ... (as `LLM` does)."""
    return [params if params.seed is None or k == 0 else dataclasses.replace(params, seed=params.seed + k)
            for k in range(n)]


# ---------------------------------------------------------------------------------------------- generation
class Generation:
    """The engine requests of one API request, admitted together; their outputs merged in arrival order.

    `start()` returns once every request is admitted (or raises the first admission error, having aborted the
    others). `outputs()` yields (choice, RequestOutput). `stop(i)` stops listening to choice i (after the caller
    finished it, e.g. on a stop string). `close()` aborts whatever is unfinished and must always be awaited."""

    def __init__(self, engine: AsyncEngine, request_id: str, jobs: list[tuple[list[int], SamplingParams]]):
        self.engine = engine
        self.rids = [f"{request_id}-{i}" for i in range(len(jobs))]
        self.jobs = jobs
        self.gens: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.live: set[int] = set(range(len(jobs)))
        self.closed = False

    async def start(self) -> None:
        self.gens = [self.engine.generate(rid, ids, p) for rid, (ids, p) in zip(self.rids, self.jobs)]
        try:
            firsts = await asyncio.gather(*(g.__anext__() for g in self.gens), return_exceptions=True)
        except BaseException:
            await self.close()
            raise
        errors = [e for e in firsts if isinstance(e, BaseException)]
        if errors:
            await self.close()
            # a bad request outranks a full queue: retrying it would not help
            raise next((e for e in errors if isinstance(e, ValueError)), errors[0])
        for i, out in enumerate(firsts):
            self.queue.put_nowait((i, out))
        self.tasks = [asyncio.ensure_future(self._pump(i, g)) for i, g in enumerate(self.gens)
                      if not firsts[i].finished]

    async def _pump(self, i: int, gen) -> None:
        try:
            async for out in gen:
                self.queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            self.queue.put_nowait((i, e))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self.live:
            i, item = await self.queue.get()
            if i not in self.live:
                continue
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.live.discard(i)
            yield i, item

    def finish(self, i: int, stop_string: str) -> None:
        """End choice i as stopped by a stop string, and stop listening to it."""
        self.engine.finish(self.rids[i], "stop", stop_string)
        self.live.discard(i)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for i in self.live:  # synchronous, so that it happens even if this task is being cancelled
            self.engine.abort(self.rids[i])
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for g in self.gens:
            try:
                await g.aclose()
            except Exception:  # noqa: BLE001 - a generator that never started, or already failed
                pass


async def _start(state: ServerState, request_id: str, jobs: list[tuple[list[int], SamplingParams]]) -> Generation:
    gen = Generation(state.engine, request_id, jobs)
    await gen.start()
    return gen


# ---------------------------------------------------------------------------------------------- responses
class EventStream(Response):
    """Server-sent events from an async iterator of bytes. If the client disconnects, the iterator is cancelled
    and closed at once, whatever it is waiting for, and then `on_close` runs (it aborts the engine requests, even
    if the iterator never started)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None):
        self.events, self.on_close = events, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = watch = None
        shutdown = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(wait_disconnect(receive))
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        except OSError:  # the client is gone
            pass
        except asyncio.CancelledError:  # the server's shutdown grace period is over
            shutdown = True
        finally:
            tasks = [t for t in (pump, watch) if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await self.events.aclose()
            finally:
                await self.on_close()
        if shutdown:  # end the stream properly: an error event, then [DONE]
            try:
                body = _error_event(EngineStopped("the server is shutting down: request aborted")) + _DONE
                await send({"type": "http.response.body", "body": body, "more_body": False})
            except OSError:
                pass
            return
        if pump is not None and not pump.cancelled() and pump.exception() is not None \
                and not isinstance(pump.exception(), OSError):
            raise pump.exception()

    async def _pump(self, send: Send) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (its cleanup aborts what it started) and raise
    ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(receive))
    shutdown = False
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server's shutdown grace period is over: answer 503
        shutdown = True
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if shutdown:
        raise EngineStopped("the server is shutting down: request aborted")
    if task.cancelled():
        raise ClientGone()
    return task.result()


def _error_event(e: BaseException) -> bytes:
    status = 503 if isinstance(e, EngineStopped) else 500
    return _sse(error_body(status, " ".join(str(e).split()) or type(e).__name__))


# ---------------------------------------------------------------------------------------------- chat
def _message_dict(m: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list):
        d["content"] = [{"type": "text", "text": p.text} for p in m.content]
    else:
        d["content"] = m.content
    if m.name is not None:
        d["name"] = m.name
    calls = getattr(m, "tool_calls", None)
    if calls:
        d["tool_calls"] = [{**({"id": c.id} if c.id is not None else {}), "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in calls]
    if getattr(m, "tool_call_id", None) is not None:
        d["tool_call_id"] = m.tool_call_id
    reasoning = getattr(m, "reasoning_content", None)
    if reasoning is None:
        reasoning = getattr(m, "reasoning", None)
    if reasoning is not None:
        d["reasoning_content"] = reasoning
    return d


def _tool_dicts(tools: list[ToolDef] | None) -> list[dict] | None:
    if not tools:
        return None
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(kwargs or {})
    for key in _RESERVED_TEMPLATE_KWARGS:
        if key in kwargs:
            raise APIError(400, f"chat_template_kwargs may not set {key!r}", param="chat_template_kwargs")
    return kwargs


def _with_system_note(messages: list[dict], note: str) -> list[dict]:
    """Append an instruction to the system message (one is added when there is none)."""
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = content + [{"type": "text", "text": note}]
        else:
            first["content"] = f"{content}\n\n{note}" if content else note
        return [first] + messages[1:]
    return [{"role": "system", "content": note}] + messages


def _chat_prompt(state: ServerState, req: ChatCompletionRequest) -> tuple[ChatPrompt, int | None]:
    """Messages, tools, tool_choice and template options -> the prompt (runs in a worker thread)."""
    messages = [_message_dict(m) for m in req.messages]
    tools = _tool_dicts(req.tools)
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not tools:
        raise APIError(400, "tool_choice requires tools", param="tool_choice")
    if choice == "none":
        tools = None
    elif isinstance(choice, NamedToolChoice):
        name = choice.function.name
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise APIError(400, f"tool_choice names a function that is not among the tools: {name!r}",
                           param="tool_choice")
        messages = _with_system_note(messages, f"You must call the function {name}.")
    elif choice == "required":
        messages = _with_system_note(messages, "You must call at least one of the functions.")
    kwargs = _template_kwargs(req.chat_template_kwargs)
    if req.reasoning_effort == "none":
        kwargs.setdefault("enable_thinking", False)
    elif req.reasoning_effort in ("minimal", "low"):
        kwargs.setdefault("low_effort", True)
    budget = req.reasoning_budget
    if budget is not None:
        kwargs["reasoning_budget"] = budget
    else:
        budget = kwargs.get("reasoning_budget")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise APIError(400, f"reasoning_budget must be an integer >= 0, got {budget!r}",
                           param="chat_template_kwargs.reasoning_budget")
    prompt = state.fmt.prompt(messages, tools, **kwargs)
    return prompt, budget


class ChatChoice:
    """One choice of a chat request: its output ids through ChatStream (and stop strings), its logprobs."""

    def __init__(self, index: int, state: ServerState, prompt: ChatPrompt, stops: list[str], logprobs: bool):
        self.index = index
        self.texts = state.token_texts
        self.stream = state.fmt.stream(prompt)
        self.stops = None
        if stops:
            self.stops = self.stream.detok = StopStrings(self.stream.detok, stops)
        self.logprobs: list[dict] | None = [] if logprobs else None
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def feed(self, out: RequestOutput) -> tuple[ChatDelta, list[dict] | None, str | None]:
        """-> (delta, logprob entries of the new tokens, the stop string that just matched)."""
        self.num_tokens = len(out.output_ids)
        delta = self.stream.add(out.new_token_ids)
        matched = self.stops.matched if self.stops is not None else None
        if out.finished or matched is not None:
            tail = self.stream.finish()
            delta = ChatDelta(delta.reasoning + tail.reasoning, delta.content + tail.content,
                              delta.tool_calls + tail.tool_calls)
            reason = "stop" if matched is not None else out.finish_reason
            if reason == "stop" and self.stream.calls:
                reason = "tool_calls"
            self.finish_reason = reason
        entries = None
        if self.logprobs is not None:
            entries = [self._entry(t, lp, top) for t, lp, top in
                       zip(out.new_token_ids, out.new_logprobs, out.new_top_logprobs)]
            self.logprobs.extend(entries)
        return delta, entries, matched

    def _entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        text, raw = self.texts.get(token)
        tops = []
        for t, lp in top or []:
            ttext, traw = self.texts.get(t)
            tops.append({"token": ttext, "logprob": _finite(lp), "bytes": traw})
        return {"token": text, "logprob": _finite(logprob), "bytes": raw, "top_logprobs": tops}


def _delta_dict(delta: ChatDelta) -> dict:
    d: dict[str, Any] = {}
    if delta.reasoning:
        d["reasoning_content"] = delta.reasoning
    if delta.content:
        d["content"] = delta.content
    if delta.tool_calls:
        calls = []
        for ev in delta.tool_calls:
            if isinstance(ev, ToolCallStart):
                calls.append({"index": ev.index, "id": ev.id, "type": "function",
                              "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, ToolCallArgumentsDelta):
                calls.append({"index": ev.index, "function": {"arguments": ev.text}})
        d["tool_calls"] = calls
    return d


async def chat_completion(state: ServerState, req: ChatCompletionRequest, receive: Receive) -> Response:
    started = time.perf_counter()
    model = resolve_model(state, req.model)
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format {req.response_format.type!r} is not supported",
                       param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    prompt, budget = await run_in_threadpool(_chat_prompt, state, req)
    rule = await run_in_threadpool(state.fmt.thinking_budget, prompt, budget) if budget is not None else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling_params(state, req, max_tokens=max_tokens, logprobs=logprobs, thinking_budget=rule)
    n = req.n or 1
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    choices = [ChatChoice(i, state, prompt, params.stop, bool(req.logprobs)) for i in range(n)]
    jobs = [(prompt.ids, p) for p in _per_choice(params, n)]
    head = {"id": request_id, "created": created, "model": model}

    if req.stream:
        gen = await until_disconnect(receive, _start(state, request_id, jobs))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _chat_events(state, gen, choices, head, len(prompt.ids), include_usage, started)
        return EventStream(events, gen.close)

    async def run() -> dict:
        gen = await _start(state, request_id, jobs)
        try:
            async for _ in _fed(gen, choices):
                pass
        finally:
            await gen.close()
        out_choices = []
        for c in choices:
            res = c.stream.result()
            message: dict[str, Any] = {"role": "assistant", "content": res.content,
                                       "reasoning_content": res.reasoning}
            if res.tool_calls:
                message["tool_calls"] = [{"id": tc.id, "type": "function",
                                          "function": {"name": tc.name, "arguments": tc.arguments_json}}
                                         for tc in res.tool_calls]
            out_choices.append({"index": c.index, "message": message,
                                "logprobs": {"content": c.logprobs} if c.logprobs is not None else None,
                                "finish_reason": c.finish_reason})
        usage = _usage(len(prompt.ids), sum(c.num_tokens for c in choices))
        return {**head, "object": "chat.completion", "choices": out_choices, "usage": usage}

    try:
        body = await until_disconnect(receive, run())
    finally:
        _done(state, "/v1/chat/completions", started)
    return JSONResponse(body)


async def _chat_events(state: ServerState, gen: Generation, choices: list[ChatChoice], head: dict,
                       prompt_tokens: int, include_usage: bool, started: float) -> AsyncIterator[bytes]:
    head = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict, logprobs: list | None = None, finish_reason: str | None = None) -> bytes:
        choice = {"index": i, "delta": delta, "logprobs": {"content": logprobs} if logprobs is not None else None,
                  "finish_reason": finish_reason}
        return _sse({**head, "choices": [choice], **extra})

    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for c, (delta, entries, _) in _fed(gen, choices):
            d = _delta_dict(delta)
            if d or entries:
                yield chunk(c.index, d, entries)
            if c.finish_reason is not None:
                yield chunk(c.index, {}, None, c.finish_reason)
        if include_usage:
            usage = _usage(prompt_tokens, sum(c.num_tokens for c in choices))
            yield _sse({**head, "choices": [], "usage": usage})
    except EngineStopped as e:
        yield _error_event(e)
    finally:
        await gen.close()
        _done(state, "/v1/chat/completions", started)
    yield _DONE


async def _fed(gen: Generation, choices: list) -> AsyncIterator[tuple[Any, tuple]]:
    """Every engine output fed to its choice -> (choice, what its feed returned); a stop string matched in a
    choice's text ends that choice's request."""
    async for i, out in gen.outputs():
        fed = choices[i].feed(out)
        if fed[2] is not None and not out.finished:
            gen.finish(i, fed[2])
        yield choices[i], fed


def _done(state: ServerState, endpoint: str, started: float) -> None:
    state.metrics.e2e.labels(endpoint).observe(time.perf_counter() - started)
    state.metrics.drain_latencies()


# ---------------------------------------------------------------------------------------------- completions
def _completion_prompts(state: ServerState, prompt: Any) -> list[tuple[list[int], str | None]]:
    """-> [(ids, text or None)] (runs in a worker thread)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((state.fmt.tokenizer.encode(p), p))
        else:
            out.append((list(p), None))
    for ids, _ in out:
        if not ids:
            raise APIError(400, "a prompt is empty (no tokens)", param="prompt")
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids out of range [0, {state.vocab_size}): {bad[:5]}", param="prompt")
    return out


class CompletionChoice:
    def __init__(self, index: int, state: ServerState, params: SamplingParams, echo: str, logprobs: bool):
        self.index = index
        self.texts = state.token_texts
        self.tracker = _TextTracker(state.fmt.tokenizer, params)
        self.echo = echo
        self.text_parts: list[str] = [echo]
        self.logprobs: dict[str, list] | None = (
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if logprobs else None)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def feed(self, out: RequestOutput) -> tuple[str, dict | None, str | None]:
        self.num_tokens = len(out.output_ids)
        offset = len(self.echo) + self.tracker.text_len  # where the new tokens' text starts
        text, matched = self.tracker.update(out.output_ids, out.finished)
        text = text or ""
        self.text_parts.append(text)
        if out.finished or matched is not None:
            self.finish_reason = "stop" if matched is not None else out.finish_reason
        lp = None
        if self.logprobs is not None:
            lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for t, v, top in zip(out.new_token_ids, out.new_logprobs, out.new_top_logprobs):
                s = self.texts.get(t)[0]
                lp["tokens"].append(s)
                lp["token_logprobs"].append(_finite(v))
                lp["top_logprobs"].append({self.texts.get(tt)[0]: _finite(vv) for tt, vv in top or []})
                lp["text_offset"].append(offset)
                offset += 0 if s.startswith("bytes:") else len(s)
            for k, v in lp.items():
                self.logprobs[k].extend(v)
        return text, lp, matched


async def completion(state: ServerState, req: CompletionRequest, receive: Receive) -> Response:
    started = time.perf_counter()
    model = resolve_model(state, req.model)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of must equal n (or be left out)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported", param="echo")
    prompts = await run_in_threadpool(_completion_prompts, state, req.prompt)
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    params = _sampling_params(state, req, max_tokens=req.max_tokens, logprobs=req.logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    jobs, choices = [], []
    for ids, text in prompts:
        echo = (text if text is not None else state.fmt.tokenizer.decode(ids)) if req.echo else ""
        for p in _per_choice(params, n):
            choices.append(CompletionChoice(len(choices), state, p, echo, req.logprobs is not None))
            jobs.append((ids, p))
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    head = {"id": request_id, "created": created, "model": model}

    if req.stream:
        gen = await until_disconnect(receive, _start(state, request_id, jobs))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _completion_events(state, gen, choices, head, prompt_tokens, include_usage, started)
        return EventStream(events, gen.close)

    async def run() -> dict:
        gen = await _start(state, request_id, jobs)
        try:
            async for _ in _fed(gen, choices):
                pass
        finally:
            await gen.close()
        out_choices = [{"index": c.index, "text": "".join(c.text_parts), "logprobs": c.logprobs,
                        "finish_reason": c.finish_reason} for c in choices]
        usage = _usage(prompt_tokens, sum(c.num_tokens for c in choices))
        return {**head, "object": "text_completion", "choices": out_choices, "usage": usage}

    try:
        body = await until_disconnect(receive, run())
    finally:
        _done(state, "/v1/completions", started)
    return JSONResponse(body)


async def _completion_events(state: ServerState, gen: Generation, choices: list[CompletionChoice], head: dict,
                             prompt_tokens: int, include_usage: bool, started: float) -> AsyncIterator[bytes]:
    head = {**head, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str, logprobs: dict | None = None, finish_reason: str | None = None) -> bytes:
        return _sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish_reason}], **extra})

    try:
        for c in choices:
            if c.echo:
                yield chunk(c.index, c.echo)
        async for c, (text, lp, _) in _fed(gen, choices):
            if text or lp or c.finish_reason is not None:
                yield chunk(c.index, text, lp, c.finish_reason)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, sum(c.num_tokens for c in choices))})
    except EngineStopped as e:
        yield _error_event(e)
    finally:
        await gen.close()
        _done(state, "/v1/completions", started)
    yield _DONE


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenize(state: ServerState, req: TokenizeRequest) -> dict:
    resolve_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    tok = state.fmt.tokenizer
    if req.messages is not None:
        kwargs = _template_kwargs(req.chat_template_kwargs)
        text = state.fmt.template.render([_message_dict(m) for m in req.messages], tools=_tool_dicts(req.tools),
                                         add_generation_prompt=req.add_generation_prompt, **kwargs)
        ids = tok.encode(text)
    else:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [state.token_texts.get(t)[0] for t in ids]
    return out


def detokenize(state: ServerState, req: DetokenizeRequest) -> dict:
    resolve_model(state, req.model)
    bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"token ids out of range [0, {state.vocab_size}): {bad[:5]}", param="tokens")
    return {"prompt": state.fmt.tokenizer.decode(req.tokens, skip_special_tokens=req.skip_special_tokens)}

