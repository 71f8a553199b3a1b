"""Multi-token prediction block (Nemotron 3 Super): drafts token t+2 from the target's final hidden
state h_t and the embedding of token t+1. Shares the embeddings and lm_head of the main model."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ATTENTION, MOE, ModelConfig
from ..ops.linear import native_weight
from ..ops.mtp_draft import mtp_greedy, native_mtp_greedy_ok
from . import fused
from .batch import Batch, State
from .block import Block
from .fused import NativeStack
from .linear import Linear
from .norm import RMSNorm


class MTPLayer(Block):
    def __init__(self, config: ModelConfig, kind: str, layer_idx: int, first: bool, last: bool):
        super().__init__(config, kind, layer_idx)
        c = config
        if first:
            self.enorm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
            self.hnorm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
            self.eh_proj = Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        if last:
            self.final_layernorm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)


class MTP(nn.Module):
    # MTP attention layers get state ids after the main model's layers so their KV stays separate
    def __init__(self, config: ModelConfig, first_layer_id: int):
        super().__init__()
        n = len(config.mtp_pattern)
        self.layers = nn.ModuleList(
            MTPLayer(config, kind, first_layer_id + j, first=j == 0, last=j == n - 1)
            for j, kind in enumerate(config.mtp_pattern))
        # the blocks up to the last stateful one write state for every position; those after it (the MoE of
        # `*E`) feed only the outputs, and a caller may want only some rows of those
        stateful = [j for j, layer in enumerate(self.layers) if layer.stateful]
        self._cut = stateful[-1] + 1 if stateful else 0
        self._native = NativeStack()
        self._draft_cache = _DraftCache()

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, batch: Batch, state: State | None,
                rows: list[int] | None = None) -> torch.Tensor:
        """token_embeds, hidden: [N, D] -> the draft hidden states [N, D] (after final_layernorm), or only those
        of `rows` [len(rows), D]: the blocks after the last attention / Mamba layer run on those rows alone."""
        first = self.layers[0]
        x = first.eh_proj(torch.cat([first.enorm(token_embeds), first.hnorm(hidden)], dim=-1))  # [N, D]
        layers, plans, cut = list(self.layers), self._native.plans_for(self.layers), self._cut
        x = self._native(layers[:cut], x, batch, state, plans[:cut])
        if rows is not None:
            x = x[rows]  # [len(rows), D]
            batch = Batch([1] * len(rows), [0] * len(rows), [0] * len(rows))  # the blocks left keep no state
        x = self._native(layers[cut:], x, batch, state, plans[cut:])
        return self.layers[-1].final_layernorm(x)

    def greedy_drafts(self, tokens: torch.Tensor, hidden: torch.Tensor, batch: Batch, steps: int,
                      state: State | None, embeddings: nn.Module, head: nn.Module,
                      prev_out: torch.Tensor | None = None, min_confidence: float = 0.0) -> torch.Tensor | None:
        """Greedy drafts [A, k] int64 in one native call (hylm/ops/mtp_draft.py), or None where it can't run
        them (then catch up and draft one step at a time). First the catch-up: the forward over batch (each
        sequence's positions the MTP has not seen: hidden [N, D] the target's states there, tokens [N] the tokens
        after them); its last rows give the first drafts, and draft s > 0 is fed at the position s - 1 after a
        sequence's last. prev_out [A, D], if given, receives the MTP output the last drafts came from. k = steps, or
        fewer with min_confidence > 0 (see `mtp_greedy`)."""
        if (not fused.applicable(hidden) or not hasattr(state, "kv_block_tables")
                or getattr(state, "kv_dtype", None) != torch.float32):
            return None
        ready = self._draft_plan(hidden, embeddings, head)
        if ready is None:
            return None
        attention, moe, eh_proj_weight, head_weight = ready
        first, last = self.layers[0], self.layers[-1]
        ends = [c + n + steps - 1 for c, n in zip(batch.context_lens, batch.seq_lens)]  # positions written, + 1
        k_cache, v_cache, tables, block_size = state.kv_block_tables(first.mixer.layer_idx, batch.slots, ends)
        return mtp_greedy(tokens, hidden, batch.offsets, batch.context_lens, steps, embeddings.weight,
                          (first.enorm.weight, first.enorm.eps), (first.hnorm.weight, first.hnorm.eps),
                          eh_proj_weight, (last.final_layernorm.weight, last.final_layernorm.eps), head_weight,
                          attention, k_cache, v_cache, tables, block_size, moe, prev_out, min_confidence)

    def _draft_plan(self, hidden: torch.Tensor, embeddings: nn.Module, head: nn.Module) -> tuple | None:
        """The attention and MoE plans of an MTP block the native draft loop can run with these embeddings and
        head, and its eh_proj and head weights as the kernels read them (`native_weight`), or None; worked out
        again only when a tensor of the block, the head or the embeddings changed."""
        plans = tuple(self._native.plans_for(self.layers))
        # the plans themselves stay referenced by the cache, so no new plan can take an old one's id
        key = (tuple(map(id, plans)), *((t.data_ptr(), t.dtype, t.shape, t.stride(),
                                         -1 if t.is_inference() else t._version)
                                        for t in (embeddings.weight, head.weight)), hidden.shape[-1])
        cache = self._draft_cache
        if cache.key == key:
            return (*plans, *cache.weights) if cache.ok else None
        first, last = self.layers[0], self.layers[-1]
        ok = ([layer.kind for layer in self.layers] == [ATTENTION, MOE] and type(embeddings) is nn.Embedding
              and all(type(m) in (nn.Linear, Linear) and m.bias is None for m in (first.eh_proj, head))
              and all(type(n).forward is RMSNorm.forward for n in (first.enorm, first.hnorm, last.final_layernorm))
              and None not in plans
              and native_mtp_greedy_ok(hidden, embeddings.weight, first.eh_proj.weight, head.weight,
                                       (first.enorm.weight, first.hnorm.weight, last.final_layernorm.weight)))
        cache.key, cache.plans, cache.ok = key, plans, ok
        cache.weights = (native_weight(first.eh_proj.weight), native_weight(head.weight)) if ok else ()
        return (*plans, *cache.weights) if ok else None


class _DraftCache:
    """`MTP._draft_plan`'s last answer. Plans point at the original's tensors: a copied model starts empty."""

    __slots__ = ("key", "plans", "ok", "weights")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.plans: tuple = ()
        self.ok = False
        self.weights: tuple = ()

    def __deepcopy__(self, memo: dict) -> "_DraftCache":
        return _DraftCache()

    def __reduce__(self):
        return (_DraftCache, ())
