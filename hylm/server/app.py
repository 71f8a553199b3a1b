"""The FastAPI app of one server: routes, the API-key check, the body-size limit, metrics and error mapping.

Every error is answered in OpenAI's format (`errors.py`): 400 for invalid requests (validation, bad messages,
template errors, prompts too long), 401 for a missing or wrong API key, 404 for an unknown model or path, 413 for
a body over the size limit, 503 (with Retry-After) when the waiting queue is full or the engine is stopping, and
500 only for a bug (none is expected).

Middleware are plain ASGI (they never buffer a streaming response): outermost the request counter, then the
API-key check, then the body-size limit, which reads the whole body (at most `max_body_bytes`) before the app
sees it.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine.async_engine import EngineStopped, QueueFull
from . import serving
from .errors import APIError, error_response, from_api_error
from .metrics import CONTENT_TYPE
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeRequest,
                       TokenizeResponse)
from .state import ServerState

log = logging.getLogger("hylm.server")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
             "/metrics", "/openapi.json", "/docs")
_DRAIN_LIMIT = 64 * 1024 * 1024  # an oversize body is read (and dropped) up to this, so the client sees the 413

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


# ---------------------------------------------------------------------------------------------- middleware
async def _send_error(send: Send, status: int, message: str, **kw: Any) -> None:
    response = error_response(status, message, **kw)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class CountRequests:
    """Counts every HTTP request by endpoint and status code (499: the client left before the response)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            status = 500
            raise
        finally:
            self.state.metrics.count_http(_endpoint(scope["path"]), status)


def _endpoint(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class CheckAPIKey:
    """`Authorization: Bearer <key>` on the API paths, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.key is not None and scope["type"] == "http" and scope["method"] != "OPTIONS"
                and scope["path"].startswith(PROTECTED_PREFIXES)):
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    scheme, _, token = value.partition(b" ")
                    if scheme.lower() == b"bearer":
                        given = token.strip()
                    break
            if not hmac.compare_digest(given, self.key):
                await _send_error(send, 401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                  code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)


class LimitBody:
    """Reads the request body before the app does: over `max_bytes` (declared or counted) it answers 413."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
        too_big = declared is not None and declared > self.max_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                too_big = True
            if not too_big:
                chunks.append(body)
            if not message.get("more_body", False) or size > _DRAIN_LIMIT:
                break
        if too_big:
            await _send_error(send, 413, f"request body too large (limit {self.max_bytes} bytes)",
                              code="request_too_large", headers={"Connection": "close"})
            return
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------- errors
def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """The most specific error (the deepest location: inside a union, the member that got furthest) as one
    line, and its location as OpenAI's `param` (union member tags left out)."""
    errors = e.errors()
    if not errors:
        return "invalid request", None
    first = max(errors, key=lambda err: len(err.get("loc", ())))
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in ("model_attributes_type", "dict_type",
                                                                          "model_type"):
        return "the request body must be a JSON object, sent with 'Content-Type: application/json'", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or part.startswith(("function-", "literal")))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        return from_api_error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        message, param = _validation_message(e)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        status = 400 if e.status_code == 422 else e.status_code
        return error_response(status, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, e: QueueFull) -> Response:
        retry = str(request.app.state.hylm.retry_after)
        return error_response(503, f"server busy: {e}; retry later", code="queue_full", headers={"Retry-After": retry})

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, e: EngineStopped) -> Response:
        return error_response(503, str(e), code="engine_stopped", headers={"Retry-After": "5"})

    @app.exception_handler(serving.ClientGone)
    async def _gone(request: Request, e: serving.ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(ValueError)  # SamplingParams, RequestTooLong, TemplateError, bad messages
    async def _value_error(request: Request, e: ValueError) -> Response:
        return error_response(400, str(e) or type(e).__name__)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, e: RecursionError) -> Response:
        return error_response(400, "the request is nested too deeply")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}", type="internal_error")


# ---------------------------------------------------------------------------------------------- app
def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has let in-flight requests finish (or cancelled them after its grace period): stop the engine,
        # aborting whatever is left
        await run_in_threadpool(state.engine.shutdown, state.shutdown_timeout, True)

    app = FastAPI(title="hylm", version=__version__, lifespan=lifespan, redoc_url=None,
                  description="OpenAI-compatible API of hylm, an inference engine for hybrid Mamba-2 + MoE + "
                              "attention models (NVIDIA Nemotron 3).")
    app.state.hylm = state
    _install_error_handlers(app)
    app.add_middleware(LimitBody, max_bytes=state.max_body_bytes)
    app.add_middleware(CheckAPIKey, api_key=state.api_key)
    app.add_middleware(CountRequests, state=state)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if state.engine.error is not None:
            return error_response(503, "the engine is not running", code="engine_stopped")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def card(name: str) -> dict:
        return ModelCard(id=name, created=state.created, root=state.model_path,
                         max_model_len=state.max_model_len).model_dump()

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> dict:
        return {"object": "list", "data": [card(n) for n in state.model_names]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
    async def model(model: str) -> dict:
        return card(serving.resolve_model(state, model))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={
        **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "a chat.completion, or SSE chunks"}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat_completion(state, body, request.receive)

    @app.post("/v1/completions", response_model=CompletionResponse, responses={
        **_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "a text_completion, or SSE chunks"}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(state, body, request.receive)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    def tokenize(body: TokenizeRequest) -> dict:
        return serving.tokenize(state, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    def detokenize(body: DetokenizeRequest) -> dict:
        return serving.detokenize(state, body)

    return app
