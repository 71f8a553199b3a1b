"""Engine-level counters and latency samples; the server exports them (Prometheus) later."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MAX_LATENCY_SAMPLES = 100_000  # undrained samples beyond this are dropped, oldest first


@dataclass
class EngineMetrics:
    num_running: int = 0
    num_waiting: int = 0
    slots_used: int = 0
    slots_total: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prefill_tokens: int = 0  # tokens fed in prefill chunks (recompute after preemption included)
    decode_tokens: int = 0  # tokens generated
    steps: int = 0
    preemptions: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    spec_steps: int = 0  # verification steps
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # latency samples (seconds) since the last drain; a metrics exporter drains them into histograms
    ttft: deque = field(default_factory=lambda: deque(maxlen=MAX_LATENCY_SAMPLES))
    itl: deque = field(default_factory=lambda: deque(maxlen=MAX_LATENCY_SAMPLES))

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens produced per verification step (accepted drafts plus the target's own token)."""
        return (self.spec_accepted_tokens + self.spec_steps) / self.spec_steps if self.spec_steps else 0.0

    def drain_latencies(self) -> tuple[list[float], list[float]]:
        ttft, itl = list(self.ttft), list(self.itl)
        self.ttft.clear()
        self.itl.clear()
        return ttft, itl
