"""Mamba-2 mixer: in_proj -> causal conv1d (with state) -> SiLU -> SSD scan (fp32 state) -> gated RMSNorm
-> out_proj. Sequences with the same number of new tokens run as one dense batch; one-token (decode)
sequences take the single-step recurrence, longer ones the chunked SSD scan, each from its saved state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops.conv1d import causal_conv1d, causal_conv1d_step, conv_states_after_each
from ..ops.mamba_step import mamba_decode_step, prepare_native_mamba_block
from ..ops.mamba_step import native_supported as native_step_supported
from ..ops.ssd import ssd_chunked, ssd_step, ssd_steps
from . import fused
from .batch import Batch, State
from .linear import Linear
from .norm import GatedRMSNorm, RMSNorm


# Decode tokens, speculative verification (up to NATIVE_MAX_KEEP_TOKENS tokens per sequence, the states after
# each kept) and, with a state pool, prompts of any length take the fused native step where it is built
# (benchmarks and tests flip this to compare). For a prompt the recurrence token by token costs 2 N P
# multiply-adds per token and head, what the chunked scan spends outside its intra-chunk products, and needs no
# [Q, Q] decay matrices: conv + scan of one layer of benchmarks/bench_cpu.py's model over 4K tokens, 92-138 ms
# as PyTorch ops (chunk 128) vs 32-39 ms native in the same runs; 256 tokens 4.0-7.7 vs 1.2-1.5 ms.
native_step_enabled = True
NATIVE_MAX_KEEP_TOKENS = 16
KEPT_STATES_REUSE_BYTES = 4 << 20  # a layer's verification states up to this size stay allocated between steps


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = c.mamba_num_heads, c.mamba_head_dim
        self.n_groups, self.state_size = c.n_groups, c.ssm_state_size
        self.d_inner, self.conv_dim = c.mamba_d_inner, c.mamba_conv_dim
        self.chunk_size = c.chunk_size
        self.dt_min, self.dt_max = c.time_step_limit
        self.in_proj = Linear(c.hidden_size, c.mamba_in_proj_size, bias=c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=c.conv_kernel, groups=self.conv_dim,
                                padding=c.conv_kernel - 1, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, eps=c.layer_norm_epsilon)
        self.out_proj = Linear(self.d_inner, c.hidden_size, bias=c.use_bias)

    def _block_sources(self, norm: nn.Module) -> tuple | None:
        """The tensors the native block reads, or None where the gated norm or a projection is not the plain
        module the kernel computes."""
        if (type(self.norm) is not GatedRMSNorm
                or any(not isinstance(p, nn.Linear) or p.bias is not None for p in (self.in_proj, self.out_proj))):
            return None
        conv = self.conv1d
        return (norm.weight, self.in_proj.weight, self.out_proj.weight, conv.weight, conv.bias, self.dt_bias,
                self.A_log, self.D, self.norm.weight)

    def _prepare_block(self, norm: nn.Module, norm_weight, in_proj, out_proj, conv_weight, conv_bias, dt_bias, A_log,
                       D, gnorm_weight):
        return prepare_native_mamba_block(norm_weight, norm.eps, in_proj, out_proj, conv_weight, conv_bias, dt_bias,
                                          A_log, D, (self.dt_min, self.dt_max), gnorm_weight, self.norm.eps,
                                          self.num_heads, self.head_dim, self.n_groups, self.state_size)

    def native_block_plan(self, norm: nn.Module):
        """The prepared native kernel for the whole block x + self(norm(x)) (see fused.py), or None where the
        mixer or its norm is not the plain module the kernel computes."""
        if type(self).forward is not Mamba2Mixer.forward or type(norm).forward is not RMSNorm.forward:
            return None
        if not hasattr(self, "_plan_cache"):
            self._plan_cache = fused.PlanCache()
        sources = self._plan_cache.sources(lambda: self._block_sources(norm))
        return self._plan_cache.get(sources, lambda: self._prepare_block(norm, *sources))

    def native_block_args(self, plan, x: torch.Tensor, out: torch.Tensor, step: fused.NativeStep) -> tuple | None:
        """The kernel's arguments where the fused step would run for every sequence of the batch (one decode token
        each, or the same number of verified tokens each with states kept), else None. Sequences without context
        start from zeroed states; kept states are registered in batch.saved_states (filled when the kernel runs)."""
        t, keep, state, batch = step.tokens, step.keep, step.state, step.batch
        if (state is None or not native_step_enabled or not step.uniform
                or not (t == 1 or (keep and t <= NATIVE_MAX_KEEP_TOKENS))):
            return None
        conv_all, ssm_all = state.mamba(self.layer_idx)
        if not native_step_supported(x, conv_all, ssm_all):
            return None
        seqs = range(batch.num_seqs)
        self._reset_fresh(seqs, batch, conv_all, ssm_all)
        conv_after = ssm_after = None
        if keep:
            # one buffer per layer, reused while small: a verification's kept states are read (the engine's
            # rollback) before the next forward that keeps states, and a buffer written every step stays in cache;
            # a large model's (MBs per layer) is allocated per step, so that it is not held between steps
            shapes = plan.kept_shapes(batch.num_seqs, t)
            kept = getattr(self, "_kept", None)
            if kept is None or (tuple(kept[0].shape), tuple(kept[1].shape)) != shapes:
                kept = plan.kept_states(batch.num_seqs, t)
                small = sum(math.prod(shape) for shape in shapes) * 4 <= KEPT_STATES_REUSE_BYTES
                self._kept = kept if small else None
            conv_after, ssm_after = kept
            self._keep_states(seqs, batch, conv_after, ssm_after)
        return plan.args(x, out, conv_all, ssm_all, step.slots(), t, conv_after, ssm_after)

    def forward(self, x: torch.Tensor, batch: Batch, state: State | None) -> torch.Tensor:
        """x: [N, D] packed tokens -> [N, D]."""
        proj = self.in_proj(x)  # [N, d_inner + conv_dim + H]
        z, xbc, dt = proj.split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        y = torch.empty(x.shape[0], self.num_heads, self.head_dim, dtype=torch.float32, device=x.device)

        by_len: dict[tuple[int, bool], list[int]] = {}
        for i, n in enumerate(batch.seq_lens):
            by_len.setdefault((n, bool(batch.keep_states and batch.keep_states[i])), []).append(i)
        groups = list(by_len.values())
        for seqs in groups:
            self._scan_group(seqs, xbc, dt, y, batch, state)

        out = self.norm(y.view(x.shape[0], self.d_inner), z, x.dtype)  # [N, d_inner]
        return self.out_proj(out)

    @staticmethod
    def _reset_fresh(seqs: list[int], batch: Batch, conv_all: torch.Tensor, ssm_all: torch.Tensor) -> list[int]:
        """A sequence without context starts from zeros, whatever its slot held before. Returns seqs' slots."""
        slot_list = [batch.slots[i] for i in seqs]
        fresh = [s for s, i in zip(slot_list, seqs) if batch.context_lens[i] == 0]
        if fresh:
            conv_all[fresh] = 0
            ssm_all[fresh] = 0
        return slot_list

    def _native_step(self, seqs: list[int], t: int, keep: bool, xbc_g: torch.Tensor, dt_g: torch.Tensor,
                     batch: Batch, conv_all: torch.Tensor, ssm_all: torch.Tensor) -> torch.Tensor:
        """t tokens for each of the sequences seqs (their rows xbc_g [b*t, C], dt_g [b*t, H]) through the fused
        native step, states updated in the pool (keep: the states after every token go to batch.saved_states,
        for speculative rollback). -> y rows [b*t, H, P]"""
        slot_list = self._reset_fresh(seqs, batch, conv_all, ssm_all)
        out, convs, ssms = mamba_decode_step(
            xbc_g, dt_g, conv_all, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
            -torch.exp(self.A_log.float()), self.D, (self.dt_min, self.dt_max), ssm_all, torch.tensor(slot_list),
            self.n_groups, tokens=t, keep_states=keep)
        if keep:
            self._keep_states(seqs, batch, convs, ssms)
        return out

    def _keep_states(self, seqs: list[int], batch: Batch, convs: torch.Tensor, ssms: torch.Tensor) -> None:
        """The states after every verified token of sequences seqs (convs [b, t, C, K-1], ssms [b, t, H, P, N]),
        for the engine's rollback to the last accepted one."""
        layer_saved = batch.saved_states.setdefault(self.layer_idx, {})
        for g, i in enumerate(seqs):
            layer_saved[i] = (convs[g], ssms[g])  # [t, C, K-1], [t, H, P, N]

    def _scan_group(self, seqs: list[int], xbc: torch.Tensor, dt: torch.Tensor, y: torch.Tensor,
                    batch: Batch, state: State | None) -> None:
        """Conv + SSM for sequences that all have t new tokens; writes their rows of y [N, H, P]."""
        t = batch.seq_lens[seqs[0]]
        b = len(seqs)
        whole = b == batch.num_seqs  # the group is the whole packed batch: use views, not gathers
        keep = bool(batch.keep_states and batch.keep_states[seqs[0]])
        if not whole:
            starts = torch.tensor([batch.offsets[i] for i in seqs], device=xbc.device)
            rows = (starts[:, None] + torch.arange(t, device=xbc.device)).reshape(-1)  # [b*t]
        if state is not None and native_step_enabled and (not keep or t <= NATIVE_MAX_KEEP_TOKENS):
            conv_all, ssm_all = state.mamba(self.layer_idx)
            if native_step_supported(xbc, conv_all, ssm_all):
                out = self._native_step(seqs, t, keep, xbc if whole else xbc[rows], dt if whole else dt[rows],
                                        batch, conv_all, ssm_all)  # [b*t, H, P]
                if whole:
                    y.copy_(out)
                else:
                    y[rows] = out
                return
        xbc_g = (xbc if whole else xbc[rows]).reshape(b, t, self.conv_dim)  # [b, t, conv_dim]
        dt_g = (dt if whole else dt[rows]).reshape(b, t, self.num_heads)  # [b, t, H]
        a = -torch.exp(self.A_log.float())  # [H]
        dt_g = F.softplus(dt_g.float() + self.dt_bias.float())
        if self.dt_min > 0 or self.dt_max < math.inf:
            dt_g = dt_g.clamp(self.dt_min, self.dt_max)
        conv_w = self.conv1d.weight.squeeze(1)  # [conv_dim, K]

        in_place = False
        if state is None:
            conv_state = ssm_state = None
        else:
            conv_all, ssm_all = state.mamba(self.layer_idx)
            slot_list = self._reset_fresh(seqs, batch, conv_all, ssm_all)
            lo = slot_list[0]
            if slot_list == list(range(lo, lo + b)):  # work on the pool's memory directly
                conv_state, ssm_state, in_place = conv_all[lo: lo + b], ssm_all[lo: lo + b], True
            else:
                slots = torch.tensor(slot_list, device=xbc.device)
                conv_state, ssm_state = conv_all[slots], ssm_all[slots]  # [b, conv_dim, K-1], [b, H, P, N]

        keep = bool(batch.keep_states and batch.keep_states[seqs[0]])
        if keep and state is not None:
            # speculative verification: the states after every position are kept for rollback
            convs = conv_states_after_each(xbc_g, conv_state)  # [b, t, conv_dim, K-1]
            h, conv_state = causal_conv1d(xbc_g, conv_w, self.conv1d.bias, conv_state)
            h = F.silu(h)  # [b, t, conv_dim]
            xs, bmat, cmat = h.split([self.d_inner, self.n_groups * self.state_size,
                                      self.n_groups * self.state_size], dim=-1)
            out, ssms = ssd_steps(ssm_state, xs.reshape(b, t, self.num_heads, self.head_dim), dt_g, a,
                                  bmat.reshape(b, t, self.n_groups, self.state_size),
                                  cmat.reshape(b, t, self.n_groups, self.state_size), self.D.float())
            final_ssm = ssms[:, -1]  # [b, H, P, N]
            self._keep_states(seqs, batch, convs, ssms)
        elif t == 1 and state is not None:
            h = F.silu(causal_conv1d_step(xbc_g[:, 0], conv_w, self.conv1d.bias, conv_state))  # [b, conv_dim]
            xs, bmat, cmat = h.split([self.d_inner, self.n_groups * self.state_size,
                                      self.n_groups * self.state_size], dim=-1)
            out = ssd_step(ssm_state, xs.view(b, self.num_heads, self.head_dim), dt_g[:, 0], a,
                           bmat.view(b, self.n_groups, self.state_size),
                           cmat.view(b, self.n_groups, self.state_size), self.D.float()).unsqueeze(1)  # [b, 1, H, P]
            final_ssm = ssm_state
        else:
            h, conv_state = causal_conv1d(xbc_g, conv_w, self.conv1d.bias, conv_state)
            h = F.silu(h)  # [b, t, conv_dim]
            xs, bmat, cmat = h.split([self.d_inner, self.n_groups * self.state_size,
                                      self.n_groups * self.state_size], dim=-1)
            out, final_ssm = ssd_chunked(
                xs.reshape(b, t, self.num_heads, self.head_dim), dt_g, a,
                bmat.reshape(b, t, self.n_groups, self.state_size), cmat.reshape(b, t, self.n_groups, self.state_size),
                self.chunk_size, D=self.D.float(), initial_state=ssm_state)  # [b, t, H, P]

        if whole:
            y.copy_(out.reshape(y.shape))
        else:
            y[rows] = out.reshape(b * t, self.num_heads, self.head_dim)
        if state is not None and in_place:
            if conv_state.data_ptr() != conv_all[lo: lo + b].data_ptr():
                conv_all[lo: lo + b] = conv_state
            if final_ssm.data_ptr() != ssm_all[lo: lo + b].data_ptr():
                ssm_all[lo: lo + b] = final_ssm
        elif state is not None:
            conv_all[slots] = conv_state.to(conv_all.dtype)
            ssm_all[slots] = final_ssm
