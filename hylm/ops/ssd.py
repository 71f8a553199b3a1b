"""Mamba-2 selective state-space (SSD) math as pure tensor functions.

Recurrence, per head ``h`` whose B/C group is ``g = h // (H // G)``::

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * (x_t outer B_t)      # state [P, N]
    y_t = h_t @ C_t + D_h * x_t

Shapes (``b`` batch, ``T`` time, ``H`` heads, ``P`` head dim, ``G`` groups,
``N`` state size):

* x: [b, T, H, P]    dt: [b, T, H] (already softplus'ed / clamped)
* A: [H] (negative)  B, C: [b, T, G, N]   D: [H] or None
* state: [b, H, P, N]

Heads are always handled as ``[G, R]`` with ``R = H // G`` so that B and C are
broadcast over the heads of a group instead of being copied per head.

Varlen prefill: with ``cu_seqlens`` ([n_seqs + 1] int, rising from 0 to T) the batch is one row (b = 1)
of packed sequences; sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1] and its own initial and final
state row ([n_seqs, H, P, N]). Empty sequences pass their state through.

Decode against a state pool: with ``state_indices`` ([b] int, distinct) ``ssd_step`` updates rows
state_indices[i] of the pool [num_slots, H, P, N] in place and leaves the other rows untouched.

``ssd_chunked`` and ``ssd_step`` take ``backend``: "auto" (the Triton kernels of `triton_ssd` on CUDA
tensors when triton is importable, else torch), "torch" or "triton".
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import backend as _backend
from .varlen import host_bounds, num_sequences

Tensor = torch.Tensor

__all__ = ["segsum", "ssd_chunked", "ssd_step", "ssd_steps", "ssd_reference", "triton_available"]

def triton_available() -> bool:
    return _backend.triton_available("triton_ssd")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    return _backend.use_triton(backend, x, "triton_ssd")


def segsum(a: Tensor) -> Tensor:
    """Segment sums of ``a`` along its last dimension.

    For ``a`` of shape [..., L] returns ``s`` of shape [..., L, L] with
    ``s[..., i, j] = sum_{k=j+1..i} a[..., k]`` for ``i >= j`` (0 on the
    diagonal) and ``-inf`` for ``i < j``. Each entry is a direct masked sum
    (no difference of two cumulative sums), so ``exp(s)`` is an accurate,
    causally masked decay matrix with entries in [0, 1] when ``a <= 0``.
    """
    L = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, L)  # [..., L(i=k), L(j)]: rep[k, j] = a[k]
    strict_lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # [L, L]: k > j
    rep = rep.masked_fill(~strict_lower, 0.0)  # [..., L, L]
    out = rep.cumsum(dim=-2)  # [..., L(i), L(j)]: sum_{j<k<=i} a[k]
    lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(0)  # [L, L]: i >= j
    return out.masked_fill(~lower, float("-inf"))  # [..., L, L]


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tuple[int, int]:
    H = x.shape[-2]
    G = B.shape[-2]
    if C.shape != B.shape:
        raise ValueError(f"B {tuple(B.shape)} and C {tuple(C.shape)} must have the same shape")
    if H % G != 0:
        raise ValueError(f"n_heads={H} is not divisible by n_groups={G}")
    if A.shape != (H,):
        raise ValueError(f"A must have shape ({H},), got {tuple(A.shape)}")
    if dt.shape != x.shape[:-1]:
        raise ValueError(f"dt {tuple(dt.shape)} does not match x {tuple(x.shape)}")
    return H, G


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Chunked SSD scan over a whole sequence (prefill).

    x: [b, T, H, P]; dt: [b, T, H]; A: [H]; B, C: [b, T, G, N]; D: [H] or None;
    initial_state: [b, H, P, N] or None. Returns (y [b, T, H, P], final_state [b, H, P, N]), both fp32.
    With cu_seqlens [n_seqs + 1] (b = 1, packed sequences) the states are [n_seqs, H, P, N].

    The result does not depend on chunk_size (up to rounding): it only trades the quadratic intra-chunk
    work (T * Q per head) against the sequential pass over T / Q chunk states. Everything is laid out
    head-major and contiguous so that the elementwise passes vectorise and the products are plain bmm.
    """
    b, T = x.shape[:2]
    H, G = _check_shapes(x, dt, A, B, C)
    R, P, N = H // G, x.shape[3], B.shape[-1]
    n_seqs = num_sequences(b, cu_seqlens)
    if initial_state is not None and tuple(initial_state.shape) != (n_seqs, H, P, N):
        raise ValueError(f"initial_state must be [{n_seqs}, {H}, {P}, {N}], got {tuple(initial_state.shape)}")
    if _use_triton(backend, x):
        from .triton_ssd import ssd_chunked_triton
        return ssd_chunked_triton(x, dt, A, B, C, chunk_size, D, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _ssd_chunked_varlen(x, dt, A, B, C, chunk_size, D, initial_state, cu_seqlens)
    f32 = torch.float32
    if initial_state is None:
        state = x.new_zeros(b, H, P, N, dtype=f32)
    else:
        state = initial_state.to(f32)
    if T == 0:
        return x.new_zeros(b, 0, H, P, dtype=f32), state.clone()
    Q = min(chunk_size, T)
    c = -(-T // Q)
    pad = c * Q - T

    dt32 = dt.to(f32)
    if pad:  # padded steps have dt = 0: no decay and no input, so the final state is exact
        dt32 = F.pad(dt32, (0, 0, 0, pad))
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    dA = (dt32 * A.to(f32)).view(b, c, Q, G, R).permute(0, 3, 4, 1, 2)  # [b, g, r, c, q]
    cs = torch.cumsum(dA, dim=-1)  # [b, g, r, c, q] decay from chunk start to each position (log)
    # x * dt in head-major layout: one copy that also makes the bmm operands contiguous
    xdt = (x.to(f32) * dt32.unsqueeze(-1)).view(b, c, Q, G, R, P).permute(0, 3, 4, 1, 2, 5).contiguous()  # [b, g, r, c, q, p]
    Bc = B.to(f32).view(b, c, Q, G, N).permute(0, 3, 1, 2, 4).contiguous()  # [b, g, c, q, n]
    Cc = C.to(f32).view(b, c, Q, G, N).permute(0, 3, 1, 2, 4).contiguous()  # [b, g, c, q, n]

    # 1. intra-chunk (diagonal blocks): y_i = sum_{j<=i} C_i.B_j exp(cs_i - cs_j) xdt_j
    cb = Cc @ Bc.transpose(-1, -2)  # [b, g, c, q(i), q(j)]
    decay = cs.unsqueeze(-1) - cs.unsqueeze(-2)  # [b, g, r, c, q(i), q(j)]
    upper = torch.ones(Q, Q, dtype=torch.bool, device=x.device).triu_(1)
    decay.masked_fill_(upper, float("-inf")).exp_()
    # in place at inference; out of place when training (exp_ saves its output for the backward pass)
    decay = decay * cb.unsqueeze(2) if decay.requires_grad else decay.mul_(cb.unsqueeze(2))
    y = decay @ xdt  # [b, g, r, c, q, p]

    # 2. each chunk's own end state: sum_j exp(cs_end - cs_j) xdt_j B_j^T
    to_end = torch.exp(cs[..., -1:] - cs)  # [b, g, r, c, q]
    chunk_states = (xdt * to_end.unsqueeze(-1)).transpose(-1, -2) @ Bc.unsqueeze(2)  # [b, g, r, c, p, n]

    # 3. pass states across chunks: the state entering chunk k, then the final state
    chunk_decay = torch.exp(cs[..., -1])  # [b, g, r, c]
    s = state.view(b, G, R, P, N)  # [b, g, r, p, n]
    entering = torch.empty(b, G, R, c, P, N, dtype=f32, device=x.device)
    for k in range(c):
        entering[:, :, :, k] = s
        s = s * chunk_decay[..., k, None, None] + chunk_states[:, :, :, k]

    # 4. inter-chunk (off-diagonal) contribution: C_i . state_entering * exp(cs_i)
    y_off = Cc.unsqueeze(2) @ entering.transpose(-1, -2)  # [b, g, r, c, q, p]
    y.addcmul_(y_off, torch.exp(cs).unsqueeze(-1))
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * Q, H, P)[:, :T]  # [b, T, h, p]
    if D is not None:
        y = y + x[:, :T].to(f32) * D.to(f32)[:, None]
    return y, s.reshape(b, H, P, N).clone()


def _ssd_chunked_varlen(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
    initial_state: Optional[Tensor], cu_seqlens: Tensor,
) -> Tuple[Tensor, Tensor]:
    """Packed sequences on the torch path: the dense scan on each sequence's slice in turn."""
    T, H, P, N = x.shape[1], x.shape[2], x.shape[3], B.shape[-1]
    bounds = host_bounds(cu_seqlens, T)
    n_seqs = len(bounds) - 1
    y = x.new_empty(1, T, H, P, dtype=torch.float32)  # [1, T, H, P]
    finals = x.new_empty(n_seqs, H, P, N, dtype=torch.float32)  # [n_seqs, H, P, N]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        s0 = None if initial_state is None else initial_state[i: i + 1]  # [1, H, P, N]
        y[:, lo:hi], finals[i: i + 1] = ssd_chunked(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi],
                                                    chunk_size, D=D, initial_state=s0, backend="torch")
    return y, finals


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    state_indices: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """One decode step of the recurrence; updates ``state`` in place.

    state: [b, H, P, N] float32 (modified); x: [b, H, P]; dt: [b, H];
    A: [H]; B, C: [b, G, N]; D: [H] or None. Returns y [b, H, P] float32.
    With state_indices [b] (distinct ints), state is the whole pool [num_slots, H, P, N] and row i of
    the inputs updates pool row state_indices[i].
    """
    H, P, N = state.shape[1:]
    b = x.shape[0]
    G = B.shape[-2]
    R = H // G
    if H % G != 0:
        raise ValueError(f"n_heads={H} is not divisible by n_groups={G}")
    if state_indices is not None:
        if state_indices.shape != (b,) or state_indices.is_floating_point():
            raise ValueError(f"state_indices must be {b} integers, got {tuple(state_indices.shape)}")
    elif state.shape[0] != b:
        raise ValueError(f"state has {state.shape[0]} rows for a batch of {b}")
    if _use_triton(backend, x):
        from .triton_ssd import ssd_step_triton
        return ssd_step_triton(state, x, dt, A, B, C, D, state_indices)
    if state_indices is not None:
        # torch path: step a gathered copy of the rows, then write them back
        idx = state_indices.to(device=state.device, dtype=torch.long)
        rows = state.index_select(0, idx)  # [b, H, P, N]
        y = ssd_step(rows, x, dt, A, B, C, D=D, backend="torch")
        state.index_copy_(0, idx, rows)
        return y
    f32 = torch.float32
    x = x.to(f32)
    dt = dt.to(f32)

    s = state.view(b, G, R, P, N)  # [b, g, r, p, n]
    dA = torch.exp(dt * A.to(f32))  # [b, h]
    xdt = (x * dt.unsqueeze(-1)).view(b, G, R, P, 1)  # [b, g, r, p, 1]
    Bv = B.to(f32).view(b, G, 1, 1, N)  # [b, g, 1, 1, n]
    s.mul_(dA.view(b, G, R, 1, 1)).addcmul_(xdt, Bv)  # [b, g, r, p, n]

    Cv = C.to(f32).view(b, G, 1, N)  # [b, g, 1, n]
    # a dot product over n, not a bmm: bmm with one output column runs ~4x slower on CPU
    y = torch.linalg.vecdot(s.view(b, G, R * P, N), Cv)  # [b, g, r*p]
    y = y.view(b, H, P)  # [b, h, p]
    if D is not None:
        y = y + x * D.to(f32)[:, None]  # [b, h, p]
    return y


def ssd_steps(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """A few recurrence steps keeping the state after every one (speculative verification rolls back to any
    accepted position). The inputs of all steps are prepared at once and each step is one fused
    multiply-add into its slot of the output, so t steps cost little more than one (t is the drafts plus one).

    state: [b, H, P, N] float32 (not modified); x: [b, t, H, P]; dt: [b, t, H]; A: [H]; B, C: [b, t, G, N];
    D: [H] or None. Returns (y [b, t, H, P], states [b, t, H, P, N]) float32.
    """
    b, H, P, N = state.shape
    t = x.shape[1]
    G = B.shape[-2]
    R = H // G
    if H % G != 0:
        raise ValueError(f"n_heads={H} is not divisible by n_groups={G}")
    f32 = torch.float32
    x, dt = x.to(f32), dt.to(f32)
    dA = torch.exp(dt * A.to(f32)).view(b, t, G, R, 1, 1)  # [b, t, g, r, 1, 1]
    xdt = (x * dt.unsqueeze(-1)).view(b, t, G, R, P, 1)  # [b, t, g, r, p, 1]
    inputs = xdt * B.to(f32).view(b, t, G, 1, 1, N)  # [b, t, g, r, p, n]
    states = torch.empty_like(inputs)  # [b, t, g, r, p, n]
    prev = state.to(f32).view(b, G, R, P, N)  # [b, g, r, p, n]
    for j in range(t):
        torch.addcmul(inputs[:, j], prev, dA[:, j], out=states[:, j])  # h_j = h_{j-1} * dA_j + dt_j x_j B_j
        prev = states[:, j]
    y = torch.linalg.vecdot(states.view(b, t, G, R * P, N), C.to(f32).view(b, t, G, 1, N))  # [b, t, g, r*p]
    y = y.view(b, t, H, P)  # [b, t, h, p]
    if D is not None:
        y = y + x * D.to(f32)[:, None]  # [b, t, h, p]
    return y, states.view(b, t, H, P, N)


def ssd_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Slow float64 token-by-token reference. Returns (y, final_state) float64."""
    H, G = _check_shapes(x, dt, A, B, C)
    b, T, _, P = x.shape
    N = B.shape[-1]
    R = H // G
    f64 = torch.float64
    x, dt, A, B, C = (t.to(f64) for t in (x, dt, A, B, C))
    if initial_state is None:
        h = torch.zeros(b, H, P, N, dtype=f64, device=x.device)  # [b, h, p, n]
    else:
        h = initial_state.to(f64).clone()  # [b, h, p, n]
    head_group = torch.arange(H, device=x.device) // R  # [h]
    y = torch.zeros(b, T, H, P, dtype=f64, device=x.device)  # [b, T, h, p]
    for t in range(T):
        Bt = B[:, t, head_group]  # [b, h, n]
        Ct = C[:, t, head_group]  # [b, h, n]
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]  # [b, h, p, n]
        h = decay[:, :, None, None] * h + inp  # [b, h, p, n]
        y[:, t] = (h * Ct[:, :, None, :]).sum(-1)  # [b, h, p]
        if D is not None:
            y[:, t] += D.to(f64)[:, None] * x[:, t]
    return y, h
