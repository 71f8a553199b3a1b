"""Request and response models of the OpenAI-compatible API, as the official `openai` client sends and reads them.

Requests are validated strictly (a string where a number belongs is an error, not a conversion) and every range
the engine would reject is declared here too, so that the OpenAPI schema tells clients the truth; the server
turns a validation failure into HTTP 400. Fields a client may send that hylm does not use (`user`, `metadata`,
`parallel_tool_calls`, ...) are accepted and ignored. vLLM-style extras (`top_k`, `min_p`,
`repetition_penalty`, `chat_template_kwargs`, `reasoning_budget`, ...) sit beside the OpenAI fields.

Responses are built as plain dicts by `serving` (streaming chunks are hot); the response models below describe
them for the OpenAPI schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS

MAX_N = 16  # samples per prompt
MAX_CHOICES = 64  # prompts x n in one request
MAX_LEGACY_LOGPROBS = MAX_LOGPROBS


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(value: Any) -> None:
    """Raise ValueError if any string in a parsed JSON value (keys included) holds a lone surrogate: JSON's
    `\\ud800` escapes decode to one, and no tokenizer can encode it. Iterative, for any nesting depth."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff): not valid Unicode")
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _integral(v: Any) -> Any:
    """JSON Schema counts 2.0 as an integer: accept a float with no fraction where an integer belongs."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_integral)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _Body(_Request):
    """A request body: checked for invalid Unicode as a whole before its fields are."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------- messages
class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    # a JSON object as text (what OpenAI sends back), or the object itself
    arguments: Union[str, dict[str, Any], None] = None


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


Content = Union[str, list[TextPart]]


class SystemMessage(_Request):
    """`developer` is treated as `system`."""
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(_Request):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(_Request):
    role: Literal["assistant"]
    content: Union[Content, None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = Field(default=None, description="another name for reasoning_content")


class ToolMessage(_Request):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None
    name: str | None = None


ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str = Field(min_length=1)


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


# ---------------------------------------------------------------------------------------------- sampling
class _Sampling(_Body):
    """Sampling fields shared by chat and completions (OpenAI's, then vLLM's extras)."""
    model: str | None = Field(default=None, description="a served model name; the default model when left out")
    temperature: float | None = Field(default=None, ge=0, description="0 = greedy; default 1")
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Int | None = Field(default=None, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = Field(default=None, description=f"up to {MAX_STOP_STRINGS} stop strings")
    seed: Int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, description="not supported: must be empty")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: Int | None = Field(default=None, ge=-1, description="0 or -1 = off")
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: Int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[Int] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None, description="'low' sets the template's low_effort, 'none' turns thinking off")
    # vLLM-style extras
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="passed to the chat template: enable_thinking, low_effort, reasoning_budget, ...")
    reasoning_budget: Int | None = Field(default=None, ge=0, description="maximum reasoning tokens")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[Int], list[list[Int]]]
    max_tokens: Int | None = Field(default=16, ge=1)
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = Field(default=None, description="not supported: must be left out")
    best_of: Int | None = Field(default=None, ge=1, le=MAX_N, description="only best_of == n is supported")


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = Field(default=None, description="text to tokenize (or give messages)")
    messages: list[ChatMessage] | None = Field(default=None, description="a conversation, rendered by the template")
    tools: list[ToolDef] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int]
    skip_special_tokens: bool = False


# ---------------------------------------------------------------------------------------------- responses
class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hylm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
