"""Offline API: `LLM(model).generate(prompts, SamplingParams(...))` and a streaming iterator."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..detokenize import IncrementalDetokenizer, StopStrings
from .engine import EngineConfig, LLMEngine
from .request import RequestOutput
from .sampling_params import SamplingParams


class Detokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Completion:
    prompt_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


@dataclass
class StreamEvent:
    prompt_index: int
    index: int  # which of the n samples
    request_id: str
    new_token_ids: list[int]
    new_text: str | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None = None
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class _TextTracker:
    """Text of one request's output: incremental detokenization (constant work per token), ended at the
    first stop string, with a tail that may still become one held back."""

    def __init__(self, tokenizer: Detokenizer | None, params: SamplingParams):
        self.detok: IncrementalDetokenizer | StopStrings | None = None
        if tokenizer is not None:
            self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
            if params.stop:
                self.detok = StopStrings(self.detok, params.stop)
        self.fed = self.shown_len = 0

    @property
    def text_len(self) -> int:
        """Characters of the output's text so far (shown or held back as a possible stop string)."""
        return self.shown_len + len(getattr(self.detok, "held", ""))

    def update(self, output_ids: list[int], finished: bool) -> tuple[str | None, str | None]:
        """Returns (new visible text, matched stop string)."""
        if self.detok is None:
            return None, None
        text = self.detok.add(output_ids[self.fed:])
        self.fed = len(output_ids)
        matched = getattr(self.detok, "matched", None)
        if finished and matched is None:
            text += self.detok.finish()
            matched = getattr(self.detok, "matched", None)
        self.shown_len += len(text)
        return text, matched


class LLM:
    def __init__(self, model: Any, tokenizer: Detokenizer | None = None, dtype: str | torch.dtype = "fp32",
                 device: str = "cpu", seed: int = 0, **engine_kwargs: Any):
        from ..loader import load_model
        from ..model import NemotronHModel

        self.model = model if isinstance(model, NemotronHModel) else load_model(model, dtype=dtype, device=device)
        if tokenizer is None and isinstance(model, (str, os.PathLike)):
            tokenizer = _load_tokenizer(model)
        self.tokenizer = tokenizer
        self.engine = LLMEngine(self.model, EngineConfig(**engine_kwargs), seed=seed)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _submit(self, prompts, params, on_prefill=None) -> list[tuple[int, int, str, SamplingParams]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        subs = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, plist)):
                ids = self._prompt_ids(prompt)
                for k in range(p.n):
                    # samples of one prompt draw from different seeds, derived from the request's seed
                    pk = p if p.seed is None or k == 0 else dataclasses.replace(p, seed=p.seed + k)
                    hook = None if on_prefill is None else functools.partial(on_prefill, i)
                    subs.append((i, k, self.engine.add_request(ids, pk, on_prefill=hook), pk))
        except Exception:
            for _, _, rid, _ in subs:
                self.engine.abort(rid)
            raise
        return subs

    def stream(self, prompts: str | list[int] | list[str] | list[list[int]],
               params: SamplingParams | list[SamplingParams] | None = None,
               on_prefill: Callable[[int, int, int], None] | None = None) -> Iterator[StreamEvent]:
        """Yield output as it is generated; closing the iterator aborts what is still running.
        on_prefill(prompt index, prompt tokens done, prompt length) reports prefill progress (see
        `LLMEngine.add_request`)."""
        subs = self._submit(prompts, params, on_prefill)
        by_id = {rid: (i, k, _TextTracker(self.tokenizer, p)) for i, k, rid, p in subs}
        live = set(by_id)
        try:
            while live:
                for out in self.engine.step():
                    if out.request_id not in by_id:
                        continue
                    yield from self._events(out, by_id, live)
        finally:
            for rid in live:
                self.engine.abort(rid)

    def _events(self, out: RequestOutput, by_id, live) -> Iterator[StreamEvent]:
        i, k, tracker = by_id[out.request_id]
        text, matched = tracker.update(out.output_ids, out.finished)
        finished, reason, stop_reason = out.finished, out.finish_reason, out.stop_reason
        if matched is not None and not finished:
            self.engine.finish(out.request_id, "stop", matched)
            finished, reason, stop_reason = True, "stop", matched
        if finished:
            live.discard(out.request_id)
        yield StreamEvent(i, k, out.request_id, out.new_token_ids, text, finished, reason, stop_reason,
                          out.new_logprobs, out.new_top_logprobs)

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
                 on_prefill: Callable[[int, int, int], None] | None = None) -> list[Completion]:
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompt_list = [prompts] if single else list(prompts)
        results: dict[tuple[int, int], CompletionOutput] = {}
        texts: dict[tuple[int, int], list[str]] = {}
        events = self.stream(prompt_list, params, on_prefill)
        bar = tqdm(total=None, disable=not use_tqdm, desc="generating", unit="tok")
        for ev in events:
            key = (ev.prompt_index, ev.index)
            res = results.setdefault(key, CompletionOutput(ev.index, []))
            res.token_ids.extend(ev.new_token_ids)
            if ev.new_logprobs:
                res.logprobs = (res.logprobs or []) + ev.new_logprobs
                res.top_logprobs = (res.top_logprobs or []) + ev.new_top_logprobs
            texts.setdefault(key, []).append(ev.new_text or "")
            bar.update(len(ev.new_token_ids))
            if ev.finished:
                res.finish_reason, res.stop_reason = ev.finish_reason, ev.stop_reason
        bar.close()
        completions = [Completion(self._prompt_ids(p)) for p in prompt_list]
        for (i, k), res in sorted(results.items()):
            res.text = "".join(texts[(i, k)]) if self.tokenizer is not None else None
            completions[i].outputs.append(res)
        return completions


def _load_tokenizer(model_dir: str | os.PathLike) -> Detokenizer | None:
    path = os.path.join(str(model_dir), "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    class _HFTokenizer:
        def __init__(self, tok: Tokenizer):
            self.tok = tok

        def encode(self, text: str) -> list[int]:
            return self.tok.encode(text, add_special_tokens=False).ids

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    return _HFTokenizer(Tokenizer.from_file(path))
