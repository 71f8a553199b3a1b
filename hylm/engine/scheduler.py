"""Continuous batching with chunked prefill.

Every step: each running request that is decoding gets one token; then requests still prefilling, and
then waiting ones (while a slot is free), get prefill chunks from what is left of the token budget.
When the KV blocks run out, the newest running request is preempted: its slot and blocks are freed and
it returns to the head of the queue, to be recomputed from its tokens so far (outputs unchanged).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .prefix_cache import PrefixCache
from .request import Request, Status
from .state_pool import StatePool


class RequestTooLong(ValueError):
    """A request that could never fit, whatever else is running."""


@dataclass
class ScheduledBatch:
    requests: list[Request]
    num_tokens: list[int]
    preempted: list[Request]

    @property
    def empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, pool: StatePool, max_num_batched_tokens: int = 1024, prefix_cache: PrefixCache | None = None):
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        limit = self.pool.sizes.max_model_len
        if prompt_len + max_tokens > limit:
            raise RequestTooLong(f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the maximum "
                                 f"model length of {limit} tokens")

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and release its state at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.slot is not None:
            self.pool.free(request.slot)
            request.slot = None

    def _chunk(self, req: Request, budget: int) -> int:
        """Tokens to feed this step: all pending ones within the budget, cut where a prefix-cache
        checkpoint is due so that the state at that position exists after the step. A decoding request
        that speculates feeds its pending token plus spec_k drafts."""
        if req.pending == 1:
            req.spec_k = min(req.spec_k, budget - 1) if budget > 1 else 0
            return min(1 + req.spec_k, budget)
        n = min(req.pending, budget)
        if self.prefix_cache is not None and n > 1:
            marks = self.prefix_cache.checkpoint_positions(len(req.prompt_ids), req.num_computed, req.num_computed + n)
            if marks:
                n = marks[0] - req.num_computed
        return n

    def _admit(self, req: Request, budget: int) -> bool:
        """Give req a slot (resuming from the longest cached prefix) and blocks for its first chunk."""
        cache = self.prefix_cache
        hit = cache.match(req.token_ids) if cache is not None and req.num_computed == 0 else None
        start = hit.length if hit is not None else req.num_computed
        n = min(req.pending - (start - req.num_computed), budget)
        need = self.pool.blocks_needed(None, start + n) - (start // self.pool.block_size if hit else 0)
        if need > self.pool.num_free_blocks and not (cache is not None and cache.free_blocks_for(need, keep=hit)):
            if cache is not None:
                cache.record(hit, admitted=False)
            return False
        slot = self.pool.allocate_slot()
        if hit is not None:
            self.pool.adopt(slot, hit.blocks, hit.length)
            self.pool.restore(slot, hit.states)
            req.num_computed = req.cached_tokens = hit.length
            req.mtp_computed = hit.length  # MTP KV comes with the shared blocks (drafts only, never output)
        if cache is not None:
            cache.record(hit, admitted=True)
        req.slot = slot
        self.pool.reserve(slot, req.num_computed + min(req.pending, budget))
        return True

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.pool.free(victim.slot)
        victim.slot = None
        victim.num_computed = 0
        victim.mtp_computed, victim.mtp_hidden = 0, []
        victim.status = Status.WAITING
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: dict[int, int] = {}  # id(request) -> tokens this step
        preempted: list[Request] = []
        order = sorted(self.running, key=lambda r: r.arrival)
        # decodes first so they are never starved by prefills, then prefill chunks of running requests
        for decoding in (True, False):
            for req in order:
                if req.status is not Status.RUNNING or id(req) in chosen or (req.pending == 1) != decoding:
                    continue
                n = self._chunk(req, budget)
                if n <= 0:
                    break
                while not self.pool.reserve(req.slot, req.num_computed + n):
                    if self.prefix_cache is not None and self.prefix_cache.evict_one():
                        continue  # cached prefixes give way before running requests do
                    victim = max((r for r in self.running), key=lambda r: r.arrival)
                    budget += chosen.pop(id(victim), 0)
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        break
                if req.status is Status.RUNNING:
                    chosen[id(req)] = n
                    budget -= n
            budget = self.max_num_batched_tokens - sum(chosen.values())
        # admit waiting requests, oldest first, while a slot and blocks for their first chunk are free
        while self.waiting and budget > 0 and self.pool.num_free_slots > 0 and not preempted:
            req = self.waiting[0]
            if not self._admit(req, budget):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            n = self._chunk(req, budget)
            chosen[id(req)] = n
            budget -= n
        scheduled = [r for r in self.running if id(r) in chosen]
        return ScheduledBatch(scheduled, [chosen[id(r)] for r in scheduled], preempted)
