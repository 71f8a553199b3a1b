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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["segsum", "ssd_chunked", "ssd_step", "ssd_reference"]


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
) -> Tuple[Tensor, Tensor]:
    """Chunked SSD scan over a whole sequence (prefill).

    Returns ``(y, final_state)``: y [b, T, H, P] float32 and final_state
    [b, H, P, N] float32. All math is done in float32. Only
    ``chunk_size x chunk_size`` decay blocks are materialised (per chunk, head).
    """
    H, G = _check_shapes(x, dt, A, B, C)
    b, T, _, P = x.shape
    N = B.shape[-1]
    R = H // G
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")

    f32 = torch.float32
    x = x.to(f32)
    dt = dt.to(f32)
    A = A.to(f32)
    B = B.to(f32)
    C = C.to(f32)

    if T == 0:
        y0 = x.new_zeros(b, 0, H, P)  # [b, 0, h, p]
        if initial_state is None:
            return y0, x.new_zeros(b, H, P, N)  # [b, h, p, n]
        return y0, initial_state.to(f32).clone()

    L = min(chunk_size, T)
    nc = -(-T // L)
    pad = nc * L - T

    # Padded steps have dt = 0: decay exp(0) = 1 and zero input, so they leave
    # the state untouched and the final state stays exact.
    xdt = x * dt.unsqueeze(-1)  # [b, T, H, P]
    a = dt * A  # [b, T, H]  log-decay per step (<= 0)
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))  # [b, nc*L, H, P]
        a = F.pad(a, (0, 0, 0, pad))  # [b, nc*L, H]
        B = F.pad(B, (0, 0, 0, 0, 0, pad))  # [b, nc*L, G, N]
        C = F.pad(C, (0, 0, 0, 0, 0, pad))  # [b, nc*L, G, N]

    xdt = xdt.reshape(b, nc, L, G, R, P)  # [b, c, l, g, r, p]
    a = a.reshape(b, nc, L, G, R).permute(0, 1, 3, 4, 2)  # [b, c, g, r, l]
    B = B.reshape(b, nc, L, G, N)  # [b, c, l, g, n]
    C = C.reshape(b, nc, L, G, N)  # [b, c, l, g, n]

    a_cum = a.cumsum(dim=-1)  # [b, c, g, r, l]  inclusive log-decay from chunk start
    decay = torch.exp(segsum(a))  # [b, c, g, r, l, s]  causal decay s -> l

    # 1) intra-chunk (diagonal blocks): y[l] = sum_{s<=l} (C_l . B_s) decay[l, s] xdt[s]
    cb = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # [b, c, g, l, s]
    m = decay * cb.unsqueeze(3)  # [b, c, g, r, l, s]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", m, xdt)  # [b, c, l, g, r, p]

    # 2) state contributed by each chunk alone, taken at the chunk's end
    decay_to_end = decay[..., -1, :]  # [b, c, g, r, s]  exp(sum_{s<k<L} a_k)
    chunk_states = torch.einsum(
        "bcgrs,bcsgrp,bcsgn->bcgrpn", decay_to_end, xdt, B
    )  # [b, c, g, r, p, n]

    # 3) pass states across chunks (sequential over chunks, linear in T)
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, c, g, r]
    if initial_state is None:
        state = x.new_zeros(b, G, R, P, N)  # [b, g, r, p, n]
    else:
        state = initial_state.to(f32).reshape(b, G, R, P, N).clone()  # [b, g, r, p, n]
    states_in = []
    for c in range(nc):
        states_in.append(state)
        state = state * chunk_decay[:, c, :, :, None, None] + chunk_states[:, c]  # [b, g, r, p, n]
    prev = torch.stack(states_in, dim=1)  # [b, c, g, r, p, n]  state entering each chunk

    # 4) inter-chunk: y[l] += exp(a_cum[l]) * (state_in @ C_l)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, prev)  # [b, c, l, g, r, p]
    in_decay = torch.exp(a_cum).permute(0, 1, 4, 2, 3)  # [b, c, l, g, r]
    y = y + y_off * in_decay.unsqueeze(-1)  # [b, c, l, g, r, p]

    y = y.reshape(b, nc * L, H, P)[:, :T]  # [b, T, h, p]
    if D is not None:
        y = y + x * D.to(f32)[:, None]  # [b, T, h, p]
    final_state = state.reshape(b, H, P, N)  # [b, h, p, n]
    return y.contiguous(), final_state


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
) -> Tensor:
    """One decode step of the recurrence; updates ``state`` in place.

    state: [b, H, P, N] float32 (modified); x: [b, H, P]; dt: [b, H];
    A: [H]; B, C: [b, G, N]; D: [H] or None. Returns y [b, H, P] float32.
    """
    b, H, P, N = state.shape
    G = B.shape[-2]
    R = H // G
    if H % G != 0:
        raise ValueError(f"n_heads={H} is not divisible by n_groups={G}")
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
