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
        self._native_state, self._native_output, self._native_drafts = NativeStack(), NativeStack(), NativeStack()

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

    def greedy_drafts(self, tokens: torch.Tensor, hidden: torch.Tensor, batch: Batch, steps: int,
                      state: State | None, embeddings: nn.Module, head: nn.Module,
                      prev_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Greedy drafts [A, steps] int64 in one native call (hylm/ops/mtp_draft.py), or None where it can't run
        them (then catch up and draft one step at a time). First the catch-up: the forward over batch (each
        sequence's positions the MTP has not seen: hidden [N, D] the target's states there, tokens [N] the tokens
        after them); its last rows give the first drafts, and draft s > 0 is fed at the position s - 1 after a
        sequence's last. prev_out [A, D], if given, receives the MTP output the last drafts came from."""
        first, last = self.layers[0], self.layers[-1]
        if (not fused.applicable(hidden) or [layer.kind for layer in self.layers] != [ATTENTION, MOE]
                or not hasattr(state, "kv_paged_layout") or getattr(state, "kv_dtype", None) != torch.float32
                or type(embeddings) is not nn.Embedding
                or any(type(m) not in (nn.Linear, Linear) or m.bias is not None for m in (first.eh_proj, head))
                or any(type(n).forward is not RMSNorm.forward for n in (first.enorm, first.hnorm, last.final_layernorm))):
            return None
        attention, moe = self._native_drafts.plans_for(self.layers)
        norms = (first.enorm.weight, first.hnorm.weight, last.final_layernorm.weight)
        if attention is None or moe is None or not native_mtp_greedy_ok(hidden, embeddings.weight,
                                                                         first.eh_proj.weight, head.weight, norms):
            return None
        # the catch-up's positions and the later drafts' follow each other: one layout for both
        a, lens = batch.num_seqs, batch.seq_lens
        both = Batch([n + steps - 1 for n in lens], batch.context_lens, batch.slots)
        k_cache, v_cache, tables, lengths, new_rows, block_size, longest = state.kv_paged_layout(
            first.mixer.layer_idx, both)
        starts = both.offsets
        if a == 1:  # the catch-up's rows come first, then the later drafts'
            n = lens[0]
            cu_rows, cu_tables, cu_lengths = new_rows[:n], tables[:n], lengths[:n]
            later_rows, later_lengths = new_rows[n:, None], lengths[n:, None]  # [steps - 1, 1]
        else:
            cu = torch.tensor([starts[i] + j for i in range(a) for j in range(lens[i])])  # [N] catch-up rows
            later = torch.tensor([[starts[i] + lens[i] + s for i in range(a)] for s in range(steps - 1)],
                                 dtype=torch.int64).view(steps - 1, a)  # [steps - 1, A]
            cu_rows, cu_tables, cu_lengths = new_rows[cu], tables[cu], lengths[cu]
            later_rows, later_lengths = new_rows[later], lengths[later]
        return mtp_greedy(tokens, hidden, batch.offsets, steps, embeddings.weight, (norms[0], first.enorm.eps),
                          (norms[1], first.hnorm.eps), first.eh_proj.weight, (norms[2], last.final_layernorm.eps),
                          head.weight, attention, k_cache, v_cache, cu_rows, cu_tables, cu_lengths, later_rows,
                          tables[starts[:-1]], later_lengths, block_size, longest, moe, prev_out)


def _run(stack: NativeStack, blocks: list, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
    if not blocks:
        return x
    out = stack(blocks, x, batch, state)
    if out is None:
        for block in blocks:
            x = block(x, batch, state)
        out = x
    return out
