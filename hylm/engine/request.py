"""A request as the engine sees it: token ids in, token ids out, and where its state lives."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; the newest running request is preempted first
    generator: torch.Generator | None = None
    max_tokens: int = 0  # params.max_tokens, or what the model length leaves when that is None
    # prompt followed by the generated tokens; the model has consumed the first num_computed of them
    token_ids: list[int] = field(init=False)
    num_computed: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    slot: int | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None
    # token-level rules a layer above may impose (e.g. a thinking budget): token ids forced next
    forced_tokens: list[int] = field(default_factory=list)
    reasoning_tokens: int = 0
    thinking_done: bool = False
    # speculative decoding with the MTP block
    speculate: bool = False
    spec_k: int = 0  # draft tokens planned for this step (0: plain decode)
    mtp_computed: int = 0  # positions whose MTP KV is valid
    mtp_hidden: list = field(default_factory=list)  # target hidden states of positions not yet fed to the MTP
    on_prefill: Callable[[int, int], None] | None = None  # prefill progress: (prompt tokens done, prompt length)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def pending(self) -> int:
        """Tokens not yet fed to the model: 1 while decoding, more while (re)prefilling."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    output_ids: list[int]
    prompt_len: int
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
