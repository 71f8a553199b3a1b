"""The chat layer around the engine: messages -> prompt ids (template + tokenizer), a thinking budget as
token-level rules, and generated ids -> reasoning / content / tool-call deltas (detokenizer + parsers).

The engine never sees text: it gets `ChatPrompt.ids` and a `ThinkingBudget` of token ids, and gives
back token ids, which `ChatStream` turns into what a client reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..engine.sampling_params import ThinkingBudget
from .reasoning import ReasoningStreamParser
from .template import ChatTemplate
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .tool_calls import ContentDelta, ToolCall, ToolCallArgumentsDelta, ToolCallStart, ToolCallStreamParser

THINK_CLOSE = "</think>"


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]
    in_thinking: bool  # the prompt ends inside an open <think>: the output starts as reasoning
    tools: list[dict] | None = None


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallStart | ToolCallArgumentsDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class ChatResult:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.tokenizer, self.template = tokenizer, template
        self._newline_ids: frozenset[int] | None = None
        # ids the detokenizer drops: end-of-turn / padding markers. Reasoning and tool tags stay as text
        # for the parsers, so special tokens are not skipped wholesale.
        self.hidden_ids = set(tokenizer.eos_token_ids)
        for t in ("<s>", "</s>", "<|im_end|>", "<|im_start|>", "<unk>", "<pad>"):
            i = tokenizer.token_to_id(t)
            if i is not None:
                self.hidden_ids.add(i)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ChatFormat":
        tok = Tokenizer.from_dir(path)
        return cls(tok, ChatTemplate.from_dir(path))

    # ---- prompt ---------------------------------------------------------------------------------------
    def prompt(self, messages: Any, tools: Any = None, **template_kwargs: Any) -> ChatPrompt:
        reserved = {"messages", "tools", "add_generation_prompt"} & set(template_kwargs)
        if reserved:
            raise ValueError(f"chat_template_kwargs: {', '.join(sorted(reserved))} cannot be set here")
        text = self.template.render(messages, tools=tools, add_generation_prompt=True, **template_kwargs)
        stripped = text.rstrip()
        in_thinking = stripped.endswith("<think>")  # "<think></think>" (thinking off) ends with "</think>"
        return ChatPrompt(text, self.tokenizer.encode(text), in_thinking, tools or None)

    # ---- thinking budget --------------------------------------------------------------------------------
    def thinking_budget(self, prompt: ChatPrompt, budget: int | None, grace: int = 64) -> ThinkingBudget | None:
        """Token-level budget rule, or None when there is nothing to enforce (no budget, thinking off)."""
        if budget is None or not prompt.in_thinking:
            return None
        close_id = self.tokenizer.token_to_id(THINK_CLOSE)
        end_ids = tuple(self.tokenizer.encode(THINK_CLOSE + "\n"))
        if close_id is None or not end_ids:
            raise ValueError("reasoning_budget: this tokenizer has no </think> token")
        return ThinkingBudget(budget, end_ids, close_id, self.newline_ids(), grace)

    def newline_ids(self) -> frozenset[int]:
        """Tokens whose text ends a line: where a budget may close the reasoning gracefully."""
        if self._newline_ids is None:
            tok = self.tokenizer
            self._newline_ids = frozenset(i for i in range(tok.vocab_size)
                                          if not tok.is_special(i) and tok.decode([i]).endswith("\n"))
        return self._newline_ids

    # ---- output -------------------------------------------------------------------------------------------
    def stream(self, prompt: ChatPrompt) -> "ChatStream":
        return ChatStream(self, prompt)

    def parse(self, prompt: ChatPrompt, token_ids: list[int]) -> ChatResult:
        s = self.stream(prompt)
        s.add(token_ids)
        s.finish()
        return s.result()


class ChatStream:
    """Generated token ids in, ChatDelta out; `result()` gives the whole message at the end."""

    def __init__(self, fmt: ChatFormat, prompt: ChatPrompt):
        self.fmt, self.prompt = fmt, prompt
        self.detok = IncrementalDetokenizer(fmt.tokenizer, skip_special_tokens=False)
        self.reasoning_parser = ReasoningStreamParser(prompt.in_thinking)
        self.tool_parser = ToolCallStreamParser(prompt.tools) if prompt.tools else None
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: dict[int, list] = {}  # index -> [id, name, argument json pieces]

    def add(self, token_ids: list[int]) -> ChatDelta:
        text = self.detok.add([t for t in token_ids if t not in self.fmt.hidden_ids])
        return self._route(self.reasoning_parser.feed(text) if text else [], final=False)

    def finish(self) -> ChatDelta:
        pieces = self.reasoning_parser.feed(self.detok.finish()) + self.reasoning_parser.finish()
        return self._route(pieces, final=True)

    def _route(self, pieces: list[tuple[str, str]], final: bool) -> ChatDelta:
        delta = ChatDelta()
        content = "".join(t for kind, t in pieces if kind == "content")
        delta.reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        if self.tool_parser is None:
            delta.content = content
        else:
            events = self.tool_parser.feed(content) if content else []
            if final:
                events += self.tool_parser.finish()
            for ev in events:
                if isinstance(ev, ContentDelta):
                    delta.content += ev.text
                elif isinstance(ev, ToolCallStart):
                    self.calls[ev.index] = [ev.id, ev.name, []]
                    delta.tool_calls.append(ev)
                elif isinstance(ev, ToolCallArgumentsDelta):
                    self.calls[ev.index][2].append(ev.text)
                    delta.tool_calls.append(ev)
        self.reasoning.append(delta.reasoning)
        self.content.append(delta.content)
        return delta

    def result(self) -> ChatResult:
        import json

        reasoning = "".join(self.reasoning) or None
        content = "".join(self.content) or None
        calls = [ToolCall(cid, name, json.loads("".join(args) or "{}")) for cid, name, args in
                 (self.calls[i] for i in sorted(self.calls))]
        return ChatResult(reasoning, content, calls)
