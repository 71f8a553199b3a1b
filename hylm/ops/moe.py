"""Mixture-of-experts routing and grouped dispatch as pure tensor functions."""

from __future__ import annotations

import torch

from . import backend as _backend
from .linear import fp32_cpu, linear, native_weight, weight_layout


def triton_available() -> bool:
    return _backend.triton_available("triton_moe")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    return _backend.use_triton(backend, x, "triton_moe")


def route_sigmoid_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3-style router used by Nemotron-H.

    logits: [N, E] fp32. Experts are chosen by sigmoid score + correction bias (the bias steers the choice
    only); with n_group > 1 only the topk_group groups with the largest top-2 sums are eligible. The
    weights are the un-biased scores of the chosen experts, normalised to sum 1 if asked, times scaling.
    Returns (weights [N, k] fp32, expert ids [N, k] int64).
    """
    scores = logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, n_group, e // n_group)  # [N, groups, experts per group]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, groups]
        keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, e)  # [N, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices  # [N, k]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


# Few tokens over small experts: when one projection of the step's tokens through one expert costs at most
# this many multiply-adds, computing every expert for every token (two large GEMMs, E/k times the useful
# work) is cheapest (hylm-tiny: up to ~20 tokens, its speculative verification).
DENSE_MAX_MACS_PER_EXPERT = 1 << 18
# Otherwise, while padding wastes at most this factor (E x the busiest expert's count over the assignments)
# and the padded hidden activations [E, capacity, I] stay within PADDED_MAX_ELEMENTS, experts run as two
# batched GEMMs over a padded [E, capacity] table (`padded_expert_mlp`) instead of a loop of 2 x E GEMMs:
# measured 2-3x faster for decode batches and ~1.2x for 1024-token prefill chunks (#3's benchmark model).
PADDED_MAX_WASTE = 3
PADDED_MAX_ELEMENTS = 1 << 25


def grouped_expert_mlp(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """sum_k weights[:, k] * down[e_k] @ relu(up[e_k] @ x)^2 with tokens grouped per expert.

    x: [N, D]; weights, ids: [N, k]; up: [E, I, D]; down: [E, D_out, I]. Tokens are sorted by expert
    so that each expert runs one GEMM over all of its tokens; the loop is over experts that received
    tokens, never over tokens. Few tokens that reach every expert on average, with experts so small that all of
    them together cost little (see DENSE_MAX_MACS_PER_EXPERT), take `dense_expert_mlp` instead; tokens spread
    evenly enough over the experts take `padded_expert_mlp` (two batched GEMMs). Accumulates in fp32;
    returns [N, D_out] in x's dtype. backend: "auto" (the fused Triton kernels of `triton_moe` on CUDA
    tensors when triton is importable, else torch), "torch" or "triton".
    """
    if _use_triton(backend, x):  # before the paths below: they read expert ids or counts back to the host
        from .triton_moe import fused_moe_triton
        return fused_moe_triton(x, weights, ids, up, down)
    n, k = ids.shape
    num_experts, inter, d_in = up.shape
    if 1 < n and n * k >= num_experts and n * inter * d_in <= DENSE_MAX_MACS_PER_EXPERT:
        return dense_expert_mlp(x, weights, ids, up, down)
    if n == 1:  # one decode token: no sorting or scattering, just its k experts
        out = None
        for j, expert in enumerate(ids[0].tolist()):
            h = relu_square(linear(x, up[expert]))
            y = linear(h, down[expert]).float() * weights[:, j: j + 1]
            out = y if out is None else out.add_(y)
        return out.to(x.dtype)
    flat_ids = ids.reshape(-1)  # [N*k]
    counts_t = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    capacity = int(counts_t.max())
    if num_experts * capacity <= PADDED_MAX_WASTE * n * k and num_experts * capacity * inter <= PADDED_MAX_ELEMENTS:
        return padded_expert_mlp(x, weights, ids, up, down, counts_t, capacity)
    order = torch.argsort(flat_ids, stable=True)  # [N*k], assignments grouped by expert
    token_of = order // k  # [N*k] source token of each sorted assignment
    counts = counts_t.tolist()
    x_sorted = x[token_of]  # [N*k, D]
    w_sorted = weights.reshape(-1)[order].unsqueeze(-1)  # [N*k, 1]
    out_sorted = torch.empty(n * k, down.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = relu_square(linear(x_sorted[start:end], up[expert]))
        out_sorted[start:end] = linear(h, down[expert]).float() * w_sorted[start:end]
        start = end
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, out_sorted)
    return out.to(x.dtype)


def relu_square(h: torch.Tensor) -> torch.Tensor:
    """relu(h)^2 of a fresh product h: in place where autograd records nothing (a prefill's [E, capacity, I]
    activations are tens of MB: two more passes and two more allocations of that size otherwise)."""
    if h.requires_grad:
        return torch.relu(h).square()
    return h.clamp_min_(0.0).square_()


def padded_expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
                      down: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """The same sum as `grouped_expert_mlp` in two batched GEMMs: each expert's tokens gathered into its row
    of an [E, capacity] table (capacity: the busiest expert's count; empty places read token 0 and are
    weighted 0). No per-expert loop: a handful of ops whatever the number of experts."""
    n, k = ids.shape
    num_experts = up.shape[0]
    flat_ids = ids.reshape(-1)  # [N*k]
    order = torch.argsort(flat_ids, stable=True)  # [N*k] assignments grouped by expert
    expert_of = flat_ids[order]  # [N*k] expert of each sorted assignment
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted assignment of each expert
    place = torch.arange(n * k, device=x.device) - starts[expert_of]  # [N*k] place within its expert
    table = torch.zeros(num_experts, capacity, dtype=torch.long, device=x.device)  # token of each place
    gate = torch.zeros(num_experts, capacity, dtype=torch.float32, device=x.device)  # its weight (0: empty)
    table[expert_of, place] = order // k
    gate[expert_of, place] = weights.reshape(-1)[order].float()
    xs = x[table]  # [E, C, D]
    h = relu_square(torch.bmm(xs, up.transpose(1, 2)))  # [E, C, I]
    y = torch.bmm(h, down.transpose(1, 2)).float()  # [E, C, D_out]
    y = y * gate.unsqueeze(-1) if y.requires_grad else y.mul_(gate.unsqueeze(-1))
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, table.view(-1), y.view(-1, y.shape[-1]))
    return out.to(x.dtype)


def dense_expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    """The same sum as `grouped_expert_mlp`, with every token through every expert and the experts it did not
    choose weighted 0: one GEMM over all up projections, one batched GEMM over the down projections."""
    n = x.shape[0]
    num_experts, inter, d_in = up.shape
    gate = torch.zeros(n, num_experts, dtype=torch.float32, device=x.device).scatter_add_(1, ids, weights.float())
    h = relu_square(x @ up.reshape(num_experts * inter, d_in).t())  # [N, E*I]
    h = h.view(n, num_experts, inter).transpose(0, 1)  # [E, N, I]
    y = torch.bmm(h, down.transpose(1, 2)).float()  # [E, N, D_out]
    out = (y * gate.t().unsqueeze(-1)).sum(0)  # [N, D_out]
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------- native
# A whole LatentMoE layer for up to this many tokens (the C kernel's limit) goes through one call of hylm's
# native kernel (hylm/ops/csrc/moe_rows.c) where it is built: decode steps, decode batches, speculative
# verification and MTP drafts, for which the PyTorch composition below is ~30 dispatches of a few microseconds.
NATIVE_MAX_ROWS = 64


def _native_weights_ok(router: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fc1: torch.Tensor | None,
                       fc2: torch.Tensor | None, shared_up: torch.Tensor | None, shared_down: torch.Tensor | None,
                       n_group: int) -> bool:
    from . import native

    if n_group != 1 or not fp32_cpu(router, up, down, fc1, fc2, shared_up, shared_down):
        return False
    if not (router.is_contiguous() and up.is_contiguous() and down.is_contiguous()):
        return False
    return all(weight_layout(w) is not None for w in (fc1, fc2, shared_up, shared_down)) and native.available()


def native_moe_ok(x: torch.Tensor, router: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  fc1: torch.Tensor | None = None, fc2: torch.Tensor | None = None,
                  shared_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None,
                  n_group: int = 1) -> bool:
    """Whether `native_moe_rows` takes these tensors: fp32 on the CPU, a few rows, no autograd, ungrouped routing,
    weights row- or column-major (experts row-major)."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= NATIVE_MAX_ROWS or not fp32_cpu(x):
        return False
    tensors = (x, router, up, down, fc1, fc2, shared_up, shared_down)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return _native_weights_ok(router, up, down, fc1, fc2, shared_up, shared_down, n_group)


class NativeMoE:
    """One MoE layer's weights, checked and turned into `hylm_moe_rows` arguments once, so that a call costs one
    dispatch. With norm_weight the call takes the block's input and returns the whole block, x + moe(norm(x)).
    Build it with `prepare_native_moe` (None where the kernel can't run these weights)."""

    def __init__(self, router: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, normalize: bool,
                 scaling: float, up: torch.Tensor, down: torch.Tensor, fc1: torch.Tensor | None = None,
                 fc2: torch.Tensor | None = None, shared_up: torch.Tensor | None = None,
                 shared_down: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0):
        from . import native

        num_experts, inter, latent = up.shape
        bias = correction_bias.float().contiguous() if correction_bias is not None else None
        norm = norm_weight.float().contiguous() if norm_weight is not None else None
        shared_size = shared_up.shape[0] if shared_up is not None else 0
        # the dense projections in panels where that reads faster
        fc1, fc2, shared_up, shared_down = (native_weight(w) for w in (fc1, fc2, shared_up, shared_down))
        self.keep = (router, bias, up, down, fc1, fc2, shared_up, shared_down, norm)  # alive while in use

        def ptr(t: torch.Tensor | None):
            return t.data_ptr() if t is not None else None

        def weight(w):  # (address, layout) of a dense projection that may be absent
            return (w.tensor.data_ptr(), w.layout) if w is not None else (None, 0)

        self.hidden = router.shape[1]
        self._kernel = native.library().hylm_moe_rows
        self._middle = (router.data_ptr(), ptr(bias), num_experts, top_k, int(normalize), float(scaling),
                        *weight(fc1), latent, up.data_ptr(), down.data_ptr(), inter, *weight(fc2), *weight(shared_up),
                        *weight(shared_down), shared_size, ptr(norm),
                        float(eps))
        self._shape = f"hidden={self.hidden}, experts={num_experts}, top_k={top_k}, latent={latent}"

    def __call__(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """x [R, D] fp32 (R <= NATIVE_MAX_ROWS) -> [R, D]; residual adds x to the output."""
        x = x.contiguous()  # [R, D]
        out = torch.empty_like(x)  # [R, D]
        self.run(self.args(x, out, residual))
        return out

    def args(self, x: torch.Tensor, out: torch.Tensor, residual: bool) -> tuple:
        """The kernel's arguments (x contiguous, out [R, D]), for `run`."""
        return (x.data_ptr(), x.shape[0], x.shape[1], *self._middle, int(residual), out.data_ptr())

    def run(self, args: tuple) -> None:
        rc = self._kernel(*args)
        if rc != 0:
            raise RuntimeError(f"native MoE kernel refused rows={args[1]}, {self._shape} (code {rc})")


def prepare_native_moe(router: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, normalize: bool,
                       scaling: float, up: torch.Tensor, down: torch.Tensor, fc1: torch.Tensor | None = None,
                       fc2: torch.Tensor | None = None, shared_up: torch.Tensor | None = None,
                       shared_down: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                       eps: float = 0.0, n_group: int = 1) -> NativeMoE | None:
    """A NativeMoE for these weights, or None where the kernel can't run them (see `native_moe_ok`)."""
    if not _native_weights_ok(router, up, down, fc1, fc2, shared_up, shared_down, n_group) or not fp32_cpu(norm_weight):
        return None
    return NativeMoE(router, correction_bias, top_k, normalize, scaling, up, down, fc1, fc2, shared_up, shared_down,
                     norm_weight, eps)


def native_moe_rows(x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                    normalize: bool, scaling: float, up: torch.Tensor, down: torch.Tensor,
                    fc1: torch.Tensor | None = None, fc2: torch.Tensor | None = None,
                    shared_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE layer of `moe_reference` for x [R, D] (R <= NATIVE_MAX_ROWS) in one native call -> [R, D].
    router [E, D]; up [E, I, L], down [E, L, I]; fc1 [L, D] and fc2 [D, L] (both None: L = D); shared_up [S, D],
    shared_down [D, S] (both None: no shared expert). Check `native_moe_ok` first."""
    return NativeMoE(router, correction_bias, top_k, normalize, scaling, up, down, fc1, fc2, shared_up,
                     shared_down)(x)


def moe_reference(x: torch.Tensor, router: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                  normalize: bool, scaling: float, up: torch.Tensor, down: torch.Tensor,
                  fc1: torch.Tensor | None = None, fc2: torch.Tensor | None = None,
                  shared_up: torch.Tensor | None = None, shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """`native_moe_rows` as PyTorch ops (what hylm's MoE layer computes on every other path)."""
    weights, ids = route_sigmoid_topk(linear(x.float(), router.float()), correction_bias, top_k, 1, 1, normalize,
                                      scaling)
    h = linear(x, fc1) if fc1 is not None else x
    y = grouped_expert_mlp(h, weights, ids, up, down)
    routed = linear(y, fc2) if fc2 is not None else y
    if shared_up is None:
        return routed
    return routed + linear(torch.relu(linear(x, shared_up)).square(), shared_down)
