"""Per-request sampling parameters, with OpenAI / vLLM meanings.

Penalties come in two flavours:

* ``repetition_penalty`` (HF style): every token seen in the prompt or the output so far has its
  logit divided by the penalty when positive and multiplied by it when negative.
* ``presence_penalty`` / ``frequency_penalty`` (OpenAI style): over the generated tokens only,
  ``logit -= presence * (count > 0) + frequency * count``.

The sampler applies them in that order, then temperature, top-k, top-p, min-p, and samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
_U64 = (1 << 64) - 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ThinkingBudget:
    """A reasoning-length rule in token ids; the chat layer fills it from its tokenizer.

    While the output is inside the reasoning (the prompt opened it), each generated token counts. Once
    `budget` tokens are spent, the reasoning ends at the next token in `newline_ids`, or when `grace`
    more tokens pass without one; ending it means forcing `end_ids` (e.g. the tokens of "</think>\n").
    Counting stops for good when the model emits `end_marker_id` itself.
    """
    budget: int
    end_ids: tuple[int, ...]
    end_marker_id: int
    newline_ids: frozenset[int] = frozenset()
    grace: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 0:
            raise ValueError(f"reasoning_budget: must be an integer >= 0, got {self.budget!r}")
        if not self.end_ids:
            raise ValueError("reasoning_budget: end_ids must not be empty")
        if self.grace < 0:
            raise ValueError("reasoning_budget: grace must be >= 0")


@dataclass
class SamplingParams:
    n: int = 1  # independent samples per prompt
    max_tokens: int | None = 16  # None: generate until the model's maximum length
    min_tokens: int = 0  # stop tokens / EOS cannot end the output before this many tokens
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of most probable tokens with cumulative prob >= top_p
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # drop tokens with prob < min_p * (max prob)
    repetition_penalty: float = 1.0  # over prompt + output tokens; 1 = off
    presence_penalty: float = 0.0  # over output tokens; 0 = off
    frequency_penalty: float = 0.0  # over output tokens; 0 = off
    seed: int | None = None  # normalised to an unsigned 64-bit integer
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob plus the top k
    skip_special_tokens: bool = True
    thinking_budget: ThinkingBudget | None = None

    def __post_init__(self) -> None:
        # friendly normalisations before checking
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (tuple, set, frozenset)):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, (tuple, set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()
        if self.seed is not None:
            self.seed = self.seed & _U64  # two's complement wrap: any int -> [0, 2**64)

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError, naming the field, for any out-of-range value."""
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not _is_real(self.temperature) or not (0.0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if (not _is_real(self.repetition_penalty)
                or not (0.0 < self.repetition_penalty < math.inf)):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if (not isinstance(self.stop_token_ids, list)
                or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS)):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    # ---------------------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        """Deterministic argmax decoding: no randomness is consumed."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
