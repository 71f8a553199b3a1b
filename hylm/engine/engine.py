"""The engine core: requests in, one batched forward per step, token ids out.

It knows token ids only: text, chat templates and HTTP live above it. Rules a layer above wants applied
to tokens (a thinking budget, say) reach it through `Request.forced_tokens` and the sampling params.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..model import Batch, NemotronHModel
from . import speculative
from .allocator import tune_process_allocator
from .metrics import EngineMetrics
from .prefix_cache import PrefixCache
from .request import Request, RequestOutput, Status
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import RequestTooLong, Scheduler
from .state_pool import PoolSizes, StatePool, plan_pool


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    max_model_len: int | None = None
    memory_bytes: int | None = None  # state + KV budget; None sizes KV for max_num_seqs x max_model_len
    block_size: int = 16
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = False
    prefix_cache_bytes: int | None = None  # state checkpoints' budget; None: room for 4 x max_num_seqs
    prefix_cache_interval_blocks: int = 16  # checkpoint long prompts every this many KV blocks
    speculative_tokens: int = 0  # MTP draft tokens per step (0: off); with a min confidence, the most per step
    # drafting stops at the first draft (after the first) the MTP gives a probability below this, for every request
    # drafting with it (0: always speculative_tokens drafts)
    speculative_min_confidence: float = 0.0
    # None or "auto": the model's dtype; bf16/fp16 halve an fp32 model's KV memory (compute stays fp32)
    kv_cache_dtype: torch.dtype | str | None = None


KV_CACHE_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_kv_cache_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value in KV_CACHE_DTYPES.values():
        return value
    if isinstance(value, str) and value in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[value]
    raise ValueError(f"kv_cache_dtype {value!r} is not one of {', '.join(KV_CACHE_DTYPES)}")


class LLMEngine:
    def __init__(self, model: NemotronHModel, config: EngineConfig | None = None, seed: int = 0):
        tune_process_allocator()
        self.model = model
        self.config = config or EngineConfig()
        c = self.config
        dtype = model.dtype
        device = model.device
        self.spec_k = c.speculative_tokens
        if self.spec_k < 0:
            raise ValueError("speculative_tokens must be >= 0")
        if not 0.0 <= c.speculative_min_confidence < 1.0:
            raise ValueError(f"speculative_min_confidence must be in [0, 1), got {c.speculative_min_confidence}")
        if self.spec_k and model.mtp is None:
            raise ValueError("speculative_tokens: this model has no MTP block (num_nextn_predict_layers is 0)")
        if self.spec_k and "M" in model.config.mtp_pattern:
            raise ValueError("speculative_tokens: MTP blocks with Mamba layers are not supported")
        kv_dtype = resolve_kv_cache_dtype(c.kv_cache_dtype)
        self.sizes: PoolSizes = plan_pool(model.config, c.max_num_seqs, c.max_model_len, c.memory_bytes,
                                          c.block_size, dtype, with_mtp=bool(self.spec_k), kv_dtype=kv_dtype)
        self.pool = StatePool(model.config, self.sizes, dtype=dtype, device=device, with_mtp=bool(self.spec_k),
                              kv_dtype=kv_dtype)
        self.prefix_cache = None
        if c.enable_prefix_caching and not getattr(model, "supports_prefix_caching", True):
            raise ValueError("prefix caching is not supported by this model (e.g. one split across processes)")
        if c.enable_prefix_caching:
            budget = c.prefix_cache_bytes if c.prefix_cache_bytes is not None else 4 * c.max_num_seqs * self.sizes.slot_bytes
            self.prefix_cache = PrefixCache(self.pool, budget, c.prefix_cache_interval_blocks)
        self.scheduler = Scheduler(self.pool, c.max_num_batched_tokens, self.prefix_cache)
        self.sampler = Sampler()
        self.metrics = EngineMetrics(slots_total=self.sizes.num_slots, blocks_total=self.sizes.num_blocks)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(seed)
        self.eos_ids = set(model.config.eos_token_ids())
        self.device = device

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, on_prefill: Callable[[int, int], None] | None = None) -> str:
        """Queue a request. on_prefill(done, total) is called after every step that computed some of its
        prompt, with the prompt tokens in the state so far (prefix-cache hits included; a preempted
        request starts again from 0) and the prompt length; the last call has done == total."""
        params = params or SamplingParams()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not (0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        bad = [t for t in params.stop_token_ids if not (0 <= t < vocab)]
        if bad:
            raise ValueError(f"stop_token_ids out of range [0, {vocab}): {bad[:5]}")
        limit = self.sizes.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(prompt_ids)
        if max_tokens < 1:
            raise RequestTooLong(f"the prompt ({len(prompt_ids)} tokens) leaves no room to generate within the "
                                 f"maximum model length of {limit} tokens")
        self.scheduler.check_fits(len(prompt_ids), max_tokens)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        # every request samples from its own generator, so its output doesn't depend on the batch
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
        req = Request(request_id, list(prompt_ids), params, next(self._arrivals),
                      generator=torch.Generator().manual_seed(seed), max_tokens=max_tokens)
        req.speculate = bool(self.spec_k) and speculative.eligible(params)
        req.on_prefill = on_prefill
        tb = params.thinking_budget
        if tb is not None and tb.budget == 0:
            req.forced_tokens = list(tb.end_ids)
            req.thinking_done = True
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.metrics.prompt_tokens += len(prompt_ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its slot and blocks; False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        limit = self.sizes.max_model_len
        for r in self.scheduler.running:  # drafts to plan: never past max_tokens or the model length
            r.spec_k = max(0, min(self.spec_k, r.max_tokens - r.num_output - 1, limit - len(r.token_ids) - 1)) \
                if r.speculate and r.pending == 1 else 0
        sched = self.scheduler.schedule()
        self.metrics.preemptions += len(sched.preempted)
        outputs: list[RequestOutput] = []
        if sched.empty:
            self._update_gauges()
            return outputs
        # packed in slot order, so that runs of neighbouring slots are read and written in place
        order = sorted(range(len(sched.requests)), key=lambda i: sched.requests[i].slot)
        reqs, counts = [sched.requests[i] for i in order], [sched.num_tokens[i] for i in order]
        spec = [i for i, (r, n) in enumerate(zip(reqs, counts)) if r.pending == 1 and n > 1]
        drafts = dict(zip(spec, speculative.draft(self.model, self.pool, [reqs[i] for i in spec],
                                                  self.config.speculative_min_confidence))) if spec else {}
        for i, (drafted, _) in drafts.items():  # fewer drafts than planned where the MTP was unsure
            counts[i] = 1 + len(drafted)
        ids: list[int] = []
        for i, (r, n) in enumerate(zip(reqs, counts)):
            ids += r.token_ids[r.num_computed: r.num_computed + n] if i not in drafts else \
                [r.token_ids[r.num_computed]] + drafts[i][0]
        batch = Batch(counts, [r.num_computed for r in reqs], [r.slot for r in reqs],
                      keep_states=[i in drafts for i in range(len(reqs))] if drafts else None)
        hidden = self.model.hidden_states(torch.tensor(ids, device=self.device), batch, self.pool)  # [N, D]
        sampling = [i for i, (r, n) in enumerate(zip(reqs, counts))
                    if i not in drafts and r.num_computed + n == len(r.token_ids)]
        progress = []
        for i, (r, n) in enumerate(zip(reqs, counts)):
            if i in drafts:
                continue
            r.num_computed += n
            if r.on_prefill is not None and r.num_computed - n < len(r.prompt_ids):
                progress.append(r)
            if r.speculate:  # the MTP reads these positions' hidden states at the next draft
                r.mtp_hidden.append(hidden[batch.offsets[i]: batch.offsets[i + 1]])
            if r.pending > 0 or r.num_output == 0:
                self.metrics.prefill_tokens += n
            if self.prefix_cache is not None and self.prefix_cache.checkpoint_positions(
                    len(r.prompt_ids), r.num_computed - n, r.num_computed):
                self.prefix_cache.save(r.slot, r.token_ids[: r.num_computed])
        prefilled = [r for i, r in enumerate(reqs) if i not in drafts and r.speculate and r.mtp_hidden]
        if prefilled:
            speculative.catch_up_prefill(self.model, self.pool, prefilled)
        self.metrics.steps += 1
        for r in progress:  # after the state is consistent: a callback may raise
            r.on_prefill(min(r.num_computed, len(r.prompt_ids)), len(r.prompt_ids))
        now = time.perf_counter()
        for i, (drafted, qs) in drafts.items():
            outputs.append(self._verify(reqs[i], i, batch, hidden, drafted, qs, now))
        if sampling:
            rows = [batch.offsets[i + 1] - 1 for i in sampling]
            logits = self.model.logits(hidden[rows])  # [S, V] fp32
            sreqs = [reqs[i] for i in sampling]
            self._apply_token_rules(logits, sreqs)
            out = self.sampler.sample(logits, [r.params for r in sreqs], [r.prompt_ids for r in sreqs],
                                      [r.output_ids for r in sreqs], [r.generator for r in sreqs])
            for j, r in enumerate(sreqs):
                logprob = out.logprobs[j]
                if r.forced_tokens:
                    token = r.forced_tokens.pop(0)
                    if logprob is not None:
                        logprob = float(torch.log_softmax(logits[j], -1)[token])
                else:
                    token = out.token_ids[j]
                    self._count_thinking(r, token)
                outputs.append(self._append(r, token, logprob, out.top_logprobs[j], now))
        self._update_gauges()
        return outputs

    def _verify(self, r: Request, i: int, batch: Batch, hidden: torch.Tensor, drafted: list[int],
                qs: list[torch.Tensor | None], now: float) -> RequestOutput:
        """Accept drafts against the target's logits, roll the state back to the last accepted position."""
        lo = batch.offsets[i]
        logits = self.model.logits(hidden[lo: batch.offsets[i + 1]])  # [k + 1, V]
        tokens, n_acc = speculative.accept(r, logits, drafted, qs)
        if n_acc < len(drafted):  # Mamba state after the last valid position (all valid: the pool holds it)
            for layer, saved in batch.saved_states.items():
                conv, ssm = saved[i]
                self.pool.conv[layer][r.slot].copy_(conv[n_acc])
                self.pool.ssm[layer][r.slot].copy_(ssm[n_acc])
        r.num_computed += 1 + n_acc  # KV beyond is stale and gets overwritten
        r.mtp_hidden.append(hidden[lo: lo + 1 + n_acc].clone())  # a copy: the step's hidden states can go
        m = self.metrics
        m.spec_steps += 1
        m.spec_draft_tokens += len(drafted)
        m.spec_accepted_tokens += n_acc
        logprobs = torch.log_softmax(logits, -1) if r.params.logprobs is not None else None
        new: list[int] = []
        for j, token in enumerate(tokens):
            top = None
            lp = None
            if logprobs is not None:
                lp = float(logprobs[j, token])
                k = r.params.logprobs
                if k:
                    vals, idx = logprobs[j].topk(k)
                    top = list(zip(idx.tolist(), vals.tolist()))
            self._append(r, token, lp, top, now, output=False)
            new.append(token)
            if r.finished:
                break
        return self._output(r, new)

    @staticmethod
    def _count_thinking(r: Request, token: int) -> None:
        """Enforce the thinking budget: after `budget` reasoning tokens, close the reasoning at the next
        newline token, or after `grace` more tokens without one."""
        tb = r.params.thinking_budget
        if tb is None or r.thinking_done:
            return
        if token == tb.end_marker_id:
            r.thinking_done = True
            return
        r.reasoning_tokens += 1
        if r.reasoning_tokens >= tb.budget and (token in tb.newline_ids or r.reasoning_tokens >= tb.budget + tb.grace):
            r.forced_tokens.extend(tb.end_ids)
            r.thinking_done = True

    def _apply_token_rules(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        for j, r in enumerate(reqs):
            if r.num_output < r.params.min_tokens:  # stop tokens may not end the output yet
                banned = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else self.eos_ids)
                if banned:
                    logits[j, list(banned)] = float("-inf")

    def _append(self, r: Request, token: int, logprob, top, now: float, output: bool = True) -> RequestOutput | None:
        r.token_ids.append(token)
        if r.params.logprobs is not None:
            r.logprobs.append(logprob)
            r.top_logprobs.append(top or [])
        if r.first_token_time is None:
            r.first_token_time = now
            self.metrics.ttft.append(now - r.arrival_time)
        else:
            self.metrics.itl.append(now - r.last_token_time)
        r.last_token_time = now
        self.metrics.decode_tokens += 1
        p = r.params
        if not p.ignore_eos and token in self.eos_ids and r.num_output >= p.min_tokens:
            self._finish(r, "stop", token)
        elif token in p.stop_token_ids and r.num_output >= p.min_tokens:
            self._finish(r, "stop", token)
        elif r.num_output >= r.max_tokens:
            self._finish(r, "length")
        return self._output(r, [token]) if output else None

    def _output(self, r: Request, new: list[int]) -> RequestOutput:
        k = len(new)
        return RequestOutput(r.request_id, new, r.output_ids, len(r.prompt_ids), r.finished, r.finish_reason,
                             r.stop_reason, r.logprobs[-k:] if r.params.logprobs is not None else [],
                             r.top_logprobs[-k:] if r.params.logprobs is not None else [])

    def finish(self, request_id: str, reason: str = "stop", stop_reason: int | str | None = None) -> None:
        """End a request from above (e.g. a stop string matched in its text)."""
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, reason, stop_reason)

    def _finish(self, r: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if r.finished:
            return
        if self.prefix_cache is not None and reason != "abort" and r.slot is not None and r.num_computed:
            # the next chat turn starts with this whole conversation: keep its state
            self.prefix_cache.save(r.slot, r.token_ids[: r.num_computed])
        r.status = Status.FINISHED
        r.finish_reason, r.stop_reason = reason, stop_reason
        self.scheduler.remove(r)
        self.requests.pop(r.request_id, None)
        self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        m, pool = self.metrics, self.pool
        m.num_running, m.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        m.slots_used = self.sizes.num_slots - pool.num_free_slots
        m.blocks_used = self.sizes.num_blocks - pool.num_free_blocks
