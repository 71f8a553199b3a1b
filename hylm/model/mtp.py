"""Multi-token prediction block (Nemotron 3 Super): drafts token t+2 from the target's final hidden
state h_t and the embedding of token t+1. Shares the embeddings and lm_head of the main model."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ATTENTION, MOE, ModelConfig
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
        cut = stateful[-1] + 1 if stateful else 0
        self._state_part, self._output_part = list(self.layers[:cut]), list(self.layers[cut:])
        self._native_state, self._native_output = NativeStack(), NativeStack()

    def forward(self, token_embeds: torch.Tensor, hidden: torch.Tensor, batch: Batch, state: State | None,
                rows: list[int] | None = None) -> torch.Tensor:
        """token_embeds, hidden: [N, D] -> the draft hidden states [N, D] (after final_layernorm), or only those
        of `rows` [len(rows), D]: the blocks after the last attention / Mamba layer run on those rows alone."""
        first = self.layers[0]
        x = first.eh_proj(torch.cat([first.enorm(token_embeds), first.hnorm(hidden)], dim=-1))  # [N, D]
        x = _run(self._native_state, self._state_part, x, batch, state)
        if rows is not None:
            x = x[rows]  # [len(rows), D]
            batch = Batch([1] * len(rows), [0] * len(rows), [0] * len(rows))  # the blocks left keep no state
        x = _run(self._native_output, self._output_part, x, batch, state)
        return self.layers[-1].final_layernorm(x)

    def greedy_drafts(self, prev: torch.Tensor, steps: int, context_lens: list[int], slots: list[int],
                      state: State | None, embeddings: nn.Module, head: nn.Module) -> torch.Tensor | None:
        """Greedy drafts [A, steps] int64 from the MTP's outputs prev [A, D] at each sequence's last position (the
        first from prev itself, draft s > 0 fed at position context_lens[a] + s - 1 of slot slots[a]) in one native
        call (hylm/ops/mtp_draft.py), or None where it can't run them: then draft one step at a time."""
        first, last = self.layers[0], self.layers[-1]
        if (not fused.applicable(prev) or [layer.kind for layer in self.layers] != [ATTENTION, MOE]
                or not hasattr(state, "kv_paged_layout") or getattr(state, "kv_dtype", None) != torch.float32
                or type(embeddings) is not nn.Embedding
                or any(type(m) not in (nn.Linear, Linear) or m.bias is not None for m in (first.eh_proj, head))
                or any(type(n).forward is not RMSNorm.forward for n in (first.enorm, first.hnorm, last.final_layernorm))):
            return None
        attention, moe = fused.block_plan(first), fused.block_plan(last)
        norms = (first.enorm.weight, first.hnorm.weight, last.final_layernorm.weight)
        if attention is None or moe is None or not native_mtp_greedy_ok(prev, embeddings.weight, first.eh_proj.weight,
                                                                         head.weight, norms):
            return None
        a = prev.shape[0]
        if steps > 1:  # where each later draft's key and value go and what it sees, all steps at once
            batch = Batch([steps - 1] * a, list(context_lens), list(slots))
            k_cache, v_cache, tables, lengths, new_rows, block_size, longest = state.kv_paged_layout(
                first.mixer.layer_idx, batch)
            new_rows, lengths = new_rows.view(a, steps - 1).t(), lengths.view(a, steps - 1).t()  # [steps - 1, A]
            tables = tables.view(a, -1, tables.shape[-1])[:, 0]  # [A, width]: one row per sequence
        else:
            k_cache, v_cache = state.k[first.mixer.layer_idx], state.v[first.mixer.layer_idx]
            tables = lengths = new_rows = torch.empty(0, dtype=torch.int64)
            block_size, longest = 1, 1
        return mtp_greedy(prev, steps, embeddings.weight, (norms[0], first.enorm.eps), (norms[1], first.hnorm.eps),
                          first.eh_proj.weight, (norms[2], last.final_layernorm.eps), head.weight, attention, k_cache,
                          v_cache, new_rows, tables, lengths, block_size, longest, moe)


def _run(stack: NativeStack, blocks: list, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
    if not blocks:
        return x
    out = stack(blocks, x, batch, state)
    if out is None:
        for block in blocks:
            x = block(x, batch, state)
        out = x
    return out
