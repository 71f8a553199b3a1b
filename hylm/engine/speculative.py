"""Native speculative decoding with the model's MTP block.

Per step, each speculating request (i) drafts K tokens with the MTP block: one forward over the positions
the MTP has not seen yet (real target hidden states, known next tokens), whose last row gives draft 1,
then K-1 one-token steps on the MTP's own outputs; (ii) feeds its pending token plus the K drafts to the
target in the batched step, its Mamba states kept after every position; (iii) accepts drafts by the
standard rule (greedy: argmax match; sampled: accept with min(1, p/q), else resample from the
normalised positive part of p - q; all accepted: a bonus token from p), so the output distribution is
the target's; (iv) rolls its Mamba states back to the last accepted position and forgets KV beyond it.
"""

from __future__ import annotations

import torch

from ..model import Batch
from .request import Request
from .sampler import filtered_probs
from .sampling_params import SamplingParams


def eligible(params: SamplingParams) -> bool:
    """Speculation is exact only where the target distribution at each position is known up front:
    no penalties (they depend on the accepted tokens), no forced-token rules, no min_tokens."""
    return (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
            and params.thinking_budget is None and params.min_tokens == 0)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the request samples from given logits [n, V]: one-hot argmax when greedy."""
    if params.greedy:
        return torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    probs = filtered_probs(logits / params.temperature, [params] * logits.shape[0])
    return probs / probs.sum(-1, keepdim=True)


def _pick(probs: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.greedy:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=gen))


def _catch_up_rows(model, reqs: list[Request], ends: list[int]) -> tuple[torch.Tensor, torch.Tensor, Batch, list]:
    """The MTP's inputs for positions r.mtp_computed..end of each request: the tokens after them [N], the target's
    hidden states there [N, D] (the first rows of r.mtp_hidden), their batch, and each request's pending states."""
    lens = [e - r.mtp_computed for r, e in zip(reqs, ends)]
    tokens = torch.tensor([t for r, e in zip(reqs, ends) for t in r.token_ids[r.mtp_computed + 1: e + 1]],
                          device=model.device)
    pending = [torch.cat(r.mtp_hidden) if len(r.mtp_hidden) > 1 else r.mtp_hidden[0] for r in reqs]  # [>= n, D]
    hidden = torch.cat([p[:n] for p, n in zip(pending, lens)])  # [sum(lens), D]
    return tokens, hidden, Batch(lens, [r.mtp_computed for r in reqs], [r.slot for r in reqs]), pending


def _caught_up(reqs: list[Request], ends: list[int], batch: Batch, pending: list) -> None:
    """Rows not consumed stay in r.mtp_hidden."""
    for r, p, n, e in zip(reqs, pending, batch.seq_lens, ends):
        r.mtp_computed = e
        r.mtp_hidden = [p[n:].clone()] if p.shape[0] > n else []  # a copy: frees the step's hidden states


@torch.inference_mode()
def catch_up(model, pool, reqs: list[Request], ends: list[int], last_only: bool = False) -> torch.Tensor:
    """Feed the MTP positions r.mtp_computed..end of each request (each with its target hidden state, the
    first rows of r.mtp_hidden, and the token after it, which must be known). Returns the MTP's outputs
    [sum of lengths, D], or with last_only each request's last one [R, D] (the MTP's blocks after its attention
    then run on those rows alone)."""
    return _feed(model, pool, reqs, ends, *_catch_up_rows(model, reqs, ends), last_only)


def _feed(model, pool, reqs: list[Request], ends: list[int], tokens: torch.Tensor, hidden: torch.Tensor,
          batch: Batch, pending: list, last_only: bool) -> torch.Tensor:
    """`catch_up` on its inputs from `_catch_up_rows`."""
    h = model.mtp(model.model.embeddings(tokens), hidden, batch, pool,
                  rows=batch.last_token_rows() if last_only else None)  # [sum(lens) or R, D]
    _caught_up(reqs, ends, batch, pending)
    return h


def catch_up_prefill(model, pool, reqs: list[Request]) -> None:
    """After a prefill chunk: feed the MTP every computed position but the last, so a request keeps one
    position's hidden state for it, not the whole prompt's, until its first draft. The last one stays for
    `draft`, whose first draft token comes out of it (the next step may draft: when one prompt token is
    left, it counts as decoding)."""
    ready = [r for r in reqs if r.num_computed - 1 > r.mtp_computed]
    if ready:
        catch_up(model, pool, ready, [r.num_computed - 1 for r in ready], last_only=True)


@torch.inference_mode()
def draft(model, pool, reqs: list[Request], min_confidence: float = 0.0
          ) -> list[tuple[list[int], list[torch.Tensor | None]]]:
    """Up to K_r draft tokens per request (r.spec_k) and the distributions they were drawn from (None where a draft
    is the MTP's argmax: always for greedy requests, and for every natively drafted request). With min_confidence
    > 0 the requests drafting together stop early: at the first draft after their first at which the MTP gives
    every one of them a probability below min_confidence (that draft dropped), so all of them keep the same count."""
    by_k: dict[int, list[int]] = {}  # requests drafting the same number of tokens go together
    for i, r in enumerate(reqs):
        by_k.setdefault(r.spec_k, []).append(i)
    drafts: list = [None] * len(reqs)
    for k, group in by_k.items():
        for i, d in zip(group, _draft_group(model, pool, [reqs[i] for i in group], k, min_confidence)):
            drafts[i] = d
    return drafts


def _draft_group(model, pool, reqs: list[Request], steps: int, min_confidence: float
                 ) -> list[tuple[list[int], list[torch.Tensor | None]]]:
    """`draft` for requests that all draft `steps` tokens: catch-up and drafts in one native call where the MTP
    block allows (argmax drafts for every request: a point mass q for the sampled ones, which `accept` handles
    exactly), else through the MTP's modules one draft position at a time."""
    ends = [r.num_computed for r in reqs]
    rows = _catch_up_rows(model, reqs, ends)
    tokens, hidden, batch, pending = rows
    ids = model.mtp.greedy_drafts(tokens, hidden, batch, steps, pool, model.model.embeddings, model.lm_head,
                                  min_confidence=min_confidence)  # [R, k]
    if ids is not None:
        _caught_up(reqs, ends, batch, pending)
        return [(row, [None] * len(row)) for row in ids.tolist()]
    prev = _feed(model, pool, reqs, ends, *rows, last_only=True)  # [R, D] at each request's last position
    return _draft_stepwise(model, pool, reqs, steps, prev, min_confidence)


def _draft_stepwise(model, pool, reqs: list[Request], steps: int, prev: torch.Tensor, min_confidence: float = 0.0
                    ) -> list[tuple[list[int], list[torch.Tensor | None]]]:
    """`steps` drafts per request from the MTP's outputs prev [R, D], each fed back at the next position: argmaxes
    for greedy requests (q None; the ids stay a tensor until the end), samples from q for the others."""
    embed = model.model.embeddings
    sampled = [j for j, r in enumerate(reqs) if not r.params.greedy]
    ids, qs = [], []  # per step: [R] token ids, and each request's q (None for greedy)
    for step in range(steps):
        logits = model.logits(prev)  # [R, V]
        toks = logits.argmax(-1)  # [R]
        if step and min_confidence > 0 and float(torch.softmax(logits, -1).amax()) < min_confidence:
            break  # every request's draft here is unlikely to be accepted: verify the ones before
        q_step: list[torch.Tensor | None] = [None] * len(reqs)
        for j in sampled:
            r = reqs[j]
            q_step[j] = distribution(logits[j: j + 1], r.params)[0]
            toks[j] = _pick(q_step[j], r.params, r.generator)
        ids.append(toks)
        qs.append(q_step)
        if step + 1 < steps:  # the next draft position reads the MTP's own output at the previous one
            batch = Batch([1] * len(reqs), [r.num_computed + step for r in reqs], [r.slot for r in reqs])
            prev = model.mtp(embed(toks), prev, batch, pool)  # [R, D]
    rows = torch.stack(ids, 1).tolist()  # [R, k]
    return [(rows[j], [q[j] for q in qs]) for j in range(len(reqs))]


def accept(r: Request, target_logits: torch.Tensor, drafted: list[int], qs: list[torch.Tensor | None]
           ) -> tuple[list[int], int]:
    """Tokens to append (accepted drafts, then one token from the target) and how many drafts were
    accepted. target_logits: [k + 1, V], row j predicts the token after the j-th fed token."""
    if r.params.greedy:  # accept drafts while they equal the target's argmax, then its argmax
        best = target_logits.argmax(-1).tolist()  # [k + 1]
        n_acc = 0
        while n_acc < len(drafted) and drafted[n_acc] == best[n_acc]:
            n_acc += 1
        return drafted[:n_acc] + [best[n_acc]], n_acc
    p = distribution(target_logits, r.params)  # [k + 1, V]
    out: list[int] = []
    for j, (d, q) in enumerate(zip(drafted, qs)):
        u = float(torch.rand((), generator=r.generator))
        # q None: the draft was the MTP's argmax, a point mass at d (q[d] = 1)
        ok = u * (float(q[d]) if q is not None else 1.0) < float(p[j, d])  # u < p/q without dividing by a tiny q
        if ok:
            out.append(d)
            continue
        if q is None:
            residual = p[j].clone()
            residual[d] = 0.0  # max(p - q, 0) for a point mass at d
        else:
            residual = (p[j] - q).clamp_min_(0.0)
        total = float(residual.sum())
        fix = residual / total if total > 0 else p[j]
        out.append(_pick(fix, r.params, r.generator))
        return out, j
    out.append(_pick(p[len(drafted)], r.params, r.generator))
    return out, len(drafted)
