"""Batched token sampler: penalties -> temperature -> top-k -> top-p -> min-p -> sample, in fp32.

Batch invariance
----------------
A row's token depends only on that row's logits, parameters, history and generator, never on the
other rows or on the batch size. To get that:

* every random draw comes from the row's own ``torch.Generator``: a sampled row draws exactly V
  Exp(1) variates per token (whatever its top-k / top-p / min-p settings), and takes
  ``argmax(probs / noise)`` (the "exponential race", which picks token i with probability
  ``probs[i] / sum(probs)``). So a generator's stream advances the same way in any batch;
* every tensor op is either elementwise with correctly rounded arithmetic (+ - * /, compares,
  selects) or a row-wise op (softmax, log_softmax, stable sort, cumsum, argmax, topk) whose result
  for one row does not read other rows. No elementwise transcendental functions are applied to
  [B, V] tensors (their SIMD and scalar paths may round differently depending on where a row
  lands in memory).

Which code path a row takes (greedy / plain sampling / filtered sampling) depends only on its own
parameters, so it is the same alone or in a batch.

Greedy rows (``temperature == 0`` or ``top_k == 1``, and temperatures below ``MIN_TEMPERATURE``)
take the argmax after penalties (ties: lowest token id) and consume no randomness.

Logprobs
--------
``SamplerOutput.logprobs`` / ``top_logprobs`` are taken from the RAW model distribution,
``log_softmax(logits)`` of the logits passed in, before penalties, temperature and filtering
(whatever the caller already did to the logits, e.g. banning EOS before ``min_tokens``, is included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

# temperatures below this are treated as greedy (logits / T would overflow fp32)
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # logprob of the sampled token under log_softmax(raw logits); None when params.logprobs is None
    logprobs: list[float | None]
    # the params.logprobs most likely tokens of the raw distribution as (token id, logprob), sorted by
    # logprob descending (ties: lower id first); None unless params.logprobs > 0
    top_logprobs: list[list[tuple[int, float]] | None]


def _is_greedy(p: SamplingParams) -> bool:
    return p.greedy or p.temperature < MIN_TEMPERATURE


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _has_filters(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    cur = torch.cuda.current_device() if a.type == "cuda" else 0
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)


def filtered_probs(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from, in token order: softmax of x (already divided by the
    temperature) restricted by top-k, then top-p, then min-p; rows are not renormalised after the last
    two filters (divide by the row sum where a true distribution is needed). x: [S, V] -> [S, V]."""
    S, V = x.shape
    dev = x.device
    filt = [j for j, p in enumerate(params) if _has_filters(p, V)]
    if len(filt) < S:
        probs = torch.softmax(x, dim=-1)
    else:
        probs = torch.empty_like(x)
    if filt:
        fi = torch.tensor(filt, device=dev)
        fp = [params[j] for j in filt]
        F = len(filt)
        # work in sorted order (descending, ties by token id) so top-k / top-p are prefixes
        sx, order = torch.sort(x.index_select(0, fi), dim=-1, descending=True, stable=True)
        pos = torch.arange(V, device=dev).unsqueeze(0)
        k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in fp], device=dev).unsqueeze(1)
        sx = sx.masked_fill(pos >= k, float("-inf"))
        sp = torch.softmax(sx, dim=-1)  # renormalised after top-k
        drop = torch.zeros(F, V, dtype=torch.bool, device=dev)
        if any(p.top_p < 1.0 for p in fp):
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in fp],
                                 dtype=torch.float32, device=dev).unsqueeze(1)
            cum = sp.cumsum(dim=-1)
            before = torch.cat([torch.zeros(F, 1, device=dev), cum[:, :-1]], dim=1)  # exclusive cumsum
            drop |= before >= top_p  # keeps the first token whose cumulative prob reaches top_p
        if any(p.min_p > 0.0 for p in fp):
            min_p = torch.tensor([p.min_p for p in fp], dtype=torch.float32, device=dev).unsqueeze(1)
            drop |= sp < min_p * sp[:, :1]  # sp[:, 0] is the max
        sp = sp.masked_fill(drop, 0.0)
        probs[fi] = torch.zeros_like(sp).scatter_(1, order, sp)  # back to token order
    return probs


class Sampler:
    """Stateless apart from a cached generator per accelerator device (see `_noise`)."""

    def __init__(self) -> None:
        self._device_generators: dict[str, torch.Generator] = {}

    # ---- public -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
               output_ids: list[list[int]], generators: list[torch.Generator | None]) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V].

        `generators[i]` is row i's generator (None: torch's default generator for the logits'
        device). A seeded request should pass the same generator, seeded once from its seed, at
        every step; its stream then advances by one fixed-size draw per sampled token.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        B, V = logits.shape
        if not (len(params) == len(prompt_ids) == len(output_ids) == len(generators) == B):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")
        logits = logits.float()
        if B == 0:
            return SamplerOutput([], [], [])
        dev = logits.device

        greedy = [_is_greedy(p) for p in params]
        penal = [i for i, p in enumerate(params) if _has_penalties(p)]
        if all(greedy) and not penal:  # fast path
            tokens = logits.argmax(dim=-1)
        else:
            x = self.apply_penalties(logits, params, prompt_ids, output_ids, rows=penal)
            tokens = torch.empty(B, dtype=torch.long, device=dev)
            g_rows = [i for i in range(B) if greedy[i]]
            s_rows = [i for i in range(B) if not greedy[i]]
            if g_rows:
                gi = torch.tensor(g_rows, device=dev)
                tokens[gi] = x.index_select(0, gi).argmax(dim=-1)
            if s_rows:
                si = torch.tensor(s_rows, device=dev)
                tokens[si] = self._sample_rows(x.index_select(0, si), [params[i] for i in s_rows],
                                               [generators[i] for i in s_rows])
        token_list = tokens.tolist()
        lps, tops = self._logprobs(logits, tokens, params)
        return SamplerOutput(token_list, lps, tops)

    def apply_penalties(self, logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
                        output_ids: list[list[int]], rows: list[int] | None = None) -> torch.Tensor:
        """Return a copy of `logits` [B, V] with repetition, presence and frequency penalties applied.

        repetition (tokens of prompt + output): logit / r if logit > 0 else logit * r;
        then (output tokens only): logit -= presence * (count > 0) + frequency * count.
        `rows` restricts the work to those rows (the others must have no penalties).
        """
        if rows is None:
            rows = [i for i, p in enumerate(params) if _has_penalties(p)]
        if not rows:
            return logits.clone()
        dev = logits.device
        V = logits.shape[1]
        R = len(rows)
        ri = torch.tensor(rows, device=dev)
        sub = logits.index_select(0, ri)  # [R, V] copy

        def flat_ids(j: int, seqs: list[list[int]]) -> torch.Tensor:
            parts = [torch.as_tensor(s, dtype=torch.long) for s in seqs if len(s)]
            if not parts:
                return torch.empty(0, dtype=torch.long)
            return torch.cat(parts) + j * V

        # repetition penalty: over every token seen in the prompt or the output
        rep = [j for j, i in enumerate(rows) if params[i].repetition_penalty != 1.0]
        if rep:
            idx = torch.cat([flat_ids(j, [prompt_ids[rows[j]], output_ids[rows[j]]]) for j in rep]).to(dev)
            seen = torch.zeros(R * V, dtype=torch.bool, device=dev)
            seen[idx] = True
            seen = seen.view(R, V)
            r = torch.tensor([params[i].repetition_penalty for i in rows], dtype=torch.float32,
                             device=dev).unsqueeze(1)
            sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)

        # presence / frequency penalties: over the output tokens only
        pf = [j for j, i in enumerate(rows) if params[i].presence_penalty != 0.0 or params[i].frequency_penalty != 0.0]
        if pf:
            idx = torch.cat([flat_ids(j, [output_ids[rows[j]]]) for j in pf]).to(dev)
            counts = torch.bincount(idx, minlength=R * V).view(R, V).to(torch.float32)
            pres = torch.tensor([params[i].presence_penalty for i in rows], dtype=torch.float32,
                                device=dev).unsqueeze(1)
            freq = torch.tensor([params[i].frequency_penalty for i in rows], dtype=torch.float32,
                                device=dev).unsqueeze(1)
            sub = sub - (pres * (counts > 0).to(torch.float32) + freq * counts)

        return logits.index_copy(0, ri, sub)

    # ---- internals --------------------------------------------------------------------------------
    def _sample_rows(self, x: torch.Tensor, params: list[SamplingParams],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the exponential race for non-greedy rows [S, V]."""
        S, V = x.shape
        dev = x.device
        temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev).unsqueeze(1)
        x = x / temp
        # exactly V Exp(1) variates per row, drawn in token-id order from the row's own generator
        noise = torch.empty(S, V, dtype=torch.float32, device=dev)
        local: dict[torch.device, bool] = {}  # generator device -> same device as the logits
        for j, g in enumerate(generators):
            self._noise(noise[j], g, local)
        noise.clamp_min_(torch.finfo(torch.float32).tiny)  # exponential_ may return 0: avoid p / 0
        return (filtered_probs(x, params) / noise).argmax(dim=-1)

    def _noise(self, buf: torch.Tensor, gen: torch.Generator | None, local: dict) -> None:
        """Fill the contiguous row `buf` [V] with Exp(1) variates from `gen`.

        When the generator lives on another device than the logits (the usual CPU generator with
        CUDA logits) the row draws one 62-bit seed from its generator and a per-device generator,
        reseeded with it, makes the V variates on the device: still a fixed-size draw per token, and
        no [V] transfer from the host.
        """
        if gen is None:
            buf.exponential_()
            return
        same = local.get(gen.device)
        if same is None:
            same = local[gen.device] = _same_device(gen.device, buf.device)
        if same:
            buf.exponential_(generator=gen)
            return
        seed = int(torch.randint(0, 1 << 62, (1,), generator=gen, device=gen.device))
        key = str(buf.device)
        dg = self._device_generators.get(key)
        if dg is None:
            dg = self._device_generators[key] = torch.Generator(device=buf.device)
        dg.manual_seed(seed)
        buf.exponential_(generator=dg)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]):
        B = len(params)
        lps: list[float | None] = [None] * B
        tops: list[list[tuple[int, float]] | None] = [None] * B
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return lps, tops
        dev = logits.device
        ri = torch.tensor(rows, device=dev)
        lp = torch.log_softmax(logits.index_select(0, ri), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, ri).unsqueeze(1)).squeeze(1).tolist()
        for i, v in zip(rows, chosen):
            lps[i] = v
        # top-k per distinct k, so a row's answer never depends on other rows' k
        by_k: dict[int, list[int]] = {}
        for j, i in enumerate(rows):
            k = min(params[i].logprobs, logits.shape[1])
            if k > 0:
                by_k.setdefault(k, []).append(j)
        for k, js in by_k.items():
            sub = lp.index_select(0, torch.tensor(js, device=dev))
            # stable descending sort: ties resolved by lower token id, deterministically
            vals, ids = torch.sort(sub, dim=-1, descending=True, stable=True)
            vals, ids = vals[:, :k].tolist(), ids[:, :k].tolist()
            for j, v, t in zip(js, vals, ids):
                tops[rows[j]] = list(zip(t, v))
        return lps, tops
