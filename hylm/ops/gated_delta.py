"""Gated delta rule (Qwen3-Next / Qwen3.5 GatedDeltaNet, Kimi Linear KDA) as pure tensor functions.

Per value head ``h`` the state ``S`` is a [K, V] matrix; for each token::

    S = exp(g) * S                 # scalar gate g (log-space decay, <= 0), or
    S = diag(exp(g)) @ S           # KDA: one gate per key channel, g is a [K] vector
    u = beta * (v - S^T k)         # delta rule: write only what S does not already predict
    S = S + k u^T
    o = S^T (q * scale)

Shapes (``B`` batch, ``T`` tokens, ``Hk`` query/key heads, ``Hv`` value heads, ``K``/``V`` head dims):

* q, k: [B, T, Hk, K]     v: [B, T, Hv, V]     beta: [B, T, Hv]
* g: [B, T, Hv] (scalar gate per head) or [B, T, Hv, K] (KDA, per key channel)
* state: [N, Hv, K, V] where N = B, or N = number of sequences with ``cu_seqlens``
* o: [B, T, Hv, V] in the input dtype; states are fp32 (fp64 for fp64 inputs)

GQA: ``Hv`` is a multiple of ``Hk``; value head ``h`` reads q/k head ``h // (Hv // Hk)`` with
``head_map="grouped"`` (Qwen3-Next's layout) or ``h % Hk`` with ``head_map="tiled"`` (llama.cpp's
broadcast). The chunked form views the value heads as [Hk, R] (R = Hv // Hk), so q/k are broadcast over
R instead of being copied and, for scalar gates, the q.k and k.k products are computed once per key
head; the torch recurrent loop gathers q/k per value head once (time-major) to keep each step to a few
batched ops.

Varlen: with ``cu_seqlens`` ([N + 1] int, cu_seqlens[0] = 0, cu_seqlens[-1] = T) the batch is one row
(B = 1) of N packed sequences; sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1] and starts from
``initial_state[i]``. Empty sequences are allowed (their state passes through).

Every input may be a strided view (e.g. slices of a fused projection); the ops read through the strides
and only gather what they compute on. All arithmetic is fp32 whatever the input dtype (fp64 inputs stay
fp64), and the returned states are in that accumulation dtype.

Two forms with the same result:

* `gated_delta_recurrent`: token by token (decode, speculative verification, short sequences). Can also
  return the state after every token (for speculative rollback). On CUDA it runs the Triton kernel of
  `triton_gated_delta` when triton is importable.
* `gated_delta_chunked`: chunkwise-parallel form for prefill, linear in T. Within a chunk of C tokens the
  C delta-rule updates fold into one unit lower-triangular system (the WY / UT representation): with
  A[i, j] = beta_i (k_i . k_j) decay(j -> i) for j < i and (I + A)^-1 computed by blocked forward
  substitution (16 x 16 diagonal blocks, then block rows by matmul), the pseudo-values are
  U = (I + A)^-1 (beta V) - (I + A)^-1 (beta e^{gamma} K) S0 = U0 - W S0, the outputs
  O = (e^{gamma} Q) S0 + (QK^T o decay) U and the chunk's final state S = e^{gamma_C} S0 +
  (e^{gamma_C - gamma} K)^T U. Everything but "U -= W S0; S = e^{gamma_C} S0 + ..." (three batched ops
  per chunk) is computed for a whole slab of chunks at once.

  Decays are not formed as exp(a) / exp(b) (outside the bounded KDA case below) or as differences of
  long cumulative sums: every exponent is a direct sum of the gates between the two positions, so
  every factor is in [0, 1] (exact and overflow-free for any gate magnitude). For KDA the pairwise
  decay is per channel and cannot be a matmul mask; the chunk is split into sub-blocks of
  ``kda_block`` tokens: pairs in different sub-blocks factor exactly through the last position r of
  the earlier sub-block (exp(g(r, i]) on the query side, exp(g(j, r]) on the key side, both <= 1), so
  they are matmuls; pairs inside one sub-block factor through the sub-block start when its decay sums
  stay within +-60 (exp of both signs is then a normal fp32 number), and otherwise are summed per
  channel with a loop over the kda_block diagonals.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backend as _backend
from .varlen import num_sequences

Tensor = torch.Tensor

__all__ = ["gated_delta_recurrent", "gated_delta_chunked", "l2norm", "triton_available"]

HEAD_MAPS = ("grouped", "tiled")
L2_EPS = 1e-6


def l2norm(x: Tensor, eps: float = L2_EPS) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension (the FLA / Qwen3-Next convention)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def triton_available() -> bool:
    return _backend.triton_available("triton_gated_delta")


# ---------------------------------------------------------------------------------------------------
# argument checks and head layout helpers
# ---------------------------------------------------------------------------------------------------

class _Spec:
    """Validated sizes of one call."""

    def __init__(self, q, k, v, g, beta, initial_state, head_map, cu_seqlens):
        if q.dim() != 4 or k.shape != q.shape:
            raise ValueError(f"q and k must both be [B, T, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
        self.B, self.T, self.Hk, self.K = q.shape
        if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
            raise ValueError(f"v must be [B, T, Hv, V] matching q {tuple(q.shape)}, got {tuple(v.shape)}")
        self.Hv, self.V = v.shape[2], v.shape[3]
        if self.Hv % self.Hk != 0:
            raise ValueError(f"value heads ({self.Hv}) must be a multiple of key heads ({self.Hk})")
        self.R = self.Hv // self.Hk
        if head_map not in HEAD_MAPS:
            raise ValueError(f"head_map must be one of {HEAD_MAPS}, got {head_map!r}")
        self.head_map = head_map
        bt = (self.B, self.T, self.Hv)
        if tuple(g.shape) == bt:
            self.kda = False
        elif tuple(g.shape) == bt + (self.K,):
            self.kda = True
        else:
            raise ValueError(f"g must be [B, T, Hv] {bt} or [B, T, Hv, K] {bt + (self.K,)}, got {tuple(g.shape)}")
        if beta is not None and tuple(beta.shape) != bt:
            raise ValueError(f"beta must be [B, T, Hv] {bt}, got {tuple(beta.shape)}")
        self.N = num_sequences(self.B, cu_seqlens)
        if initial_state is not None and tuple(initial_state.shape) != (self.N, self.Hv, self.K, self.V):
            raise ValueError(f"initial_state must be [{self.N}, {self.Hv}, {self.K}, {self.V}], "
                             f"got {tuple(initial_state.shape)}")
        self.acc = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32


def _seq_bounds(spec: _Spec, cu_seqlens: Optional[Tensor], device) -> tuple[Tensor, Tensor]:
    """(starts [N], lens [N]) of every sequence in the flattened [B*T] token rows."""
    if cu_seqlens is None:
        starts = torch.arange(spec.B, device=device) * spec.T  # [N]
        return starts, torch.full((spec.B,), spec.T, device=device, dtype=torch.long)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]  # [N]
    if int(cu[0]) != 0 or int(cu[-1]) != spec.T or bool((lens < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to T={spec.T}, got {cu.tolist()}")
    return cu[:-1], lens


def _split_heads(x: Tensor, dim: int, hk: int, r: int, head_map: str) -> Tensor:
    """View the value-head dim `dim` (size Hk*R) as two dims [Hk, R]; no copy."""
    dim = dim % x.dim()
    if head_map == "grouped":  # h = hk * R + j
        return x.unflatten(dim, (hk, r))  # [..., Hk, R, ...]
    return x.unflatten(dim, (r, hk)).transpose(dim, dim + 1)  # tiled, h = j * Hk + hk: [..., Hk, R, ...]


def _merge_heads(x: Tensor, dim: int, head_map: str) -> Tensor:
    """Inverse of `_split_heads`: dims [Hk, R] at `dim` -> one value-head dim [Hv]."""
    dim = dim % x.dim()
    if head_map == "grouped":
        return x.flatten(dim, dim + 1)  # [..., Hv, ...]
    return x.transpose(dim, dim + 1).flatten(dim, dim + 1)  # [..., Hv, ...]


def _prep_qk(q: Tensor, k: Tensor, acc: torch.dtype, scale: float, l2norm_qk: bool) -> tuple[Tensor, Tensor]:
    q = q.to(acc)
    k = k.to(acc)
    if l2norm_qk:
        q, k = l2norm(q), l2norm(k)
    return q * scale, k


def _use_triton(backend: str, x: Tensor) -> bool:
    return _backend.use_triton(backend, x, "triton_gated_delta")


# ---------------------------------------------------------------------------------------------------
# recurrent form
# ---------------------------------------------------------------------------------------------------

def gated_delta_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    head_map: str = "grouped",
    l2norm_qk: bool = False,
    return_all_states: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    backend: str = "auto",
):
    """Token-by-token gated delta rule.

    q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv] or [B, T, Hv, K] (log decays); beta [B, T, Hv]
    (None = 1); scale defaults to K**-0.5 and multiplies q after the optional L2 normalisation;
    initial_state [N, Hv, K, V] (None = zeros); cu_seqlens [N + 1] for packed sequences (B = 1).

    Returns (o [B, T, Hv, V] in q's dtype, final_state [N, Hv, K, V] fp32) and, with
    return_all_states, the state after every token [B, T, Hv, K, V] fp32 as a third element.
    backend: "auto" (Triton on CUDA when importable, else torch), "torch" or "triton".
    """
    spec = _Spec(q, k, v, g, beta, initial_state, head_map, cu_seqlens)
    scale = spec.K ** -0.5 if scale is None else float(scale)
    if _use_triton(backend, q):
        from .triton_gated_delta import gated_delta_recurrent_triton
        return gated_delta_recurrent_triton(q, k, v, g, beta, scale, initial_state, head_map, l2norm_qk,
                                            return_all_states, cu_seqlens)
    return _recurrent_torch(spec, q, k, v, g, beta, scale, initial_state, l2norm_qk, return_all_states,
                            cu_seqlens)


def _recurrent_torch(spec, q, k, v, g, beta, scale, initial_state, l2norm_qk, return_all_states, cu_seqlens):
    acc, dev = spec.acc, q.device
    B, T, Hk, Hv, K, V, R = spec.B, spec.T, spec.Hk, spec.Hv, spec.K, spec.V, spec.R
    state = torch.zeros(spec.N, Hv, K, V, dtype=acc, device=dev)  # [N, Hv, K, V], contiguous
    if initial_state is not None:
        state.copy_(initial_state)
    out = torch.empty(B, T, Hv, V, dtype=q.dtype, device=dev)  # [B, T, Hv, V]
    all_states = torch.empty(B, T, Hv, K, V, dtype=acc, device=dev) if return_all_states else None
    if T == 0:
        return (out, state, all_states) if return_all_states else (out, state)
    if beta is None:
        beta = torch.ones(B, T, Hv, dtype=acc, device=dev)  # [B, T, Hv]

    if cu_seqlens is None:
        qf, kf = _prep_qk(q, k, acc, scale, l2norm_qk)  # [B, T, Hk, K]
        _recurrent_loop(spec, qf, kf, v, g.to(acc).exp(), beta.to(acc), state, out, all_states)
    else:
        # pad the packed sequences to [N, Tmax]; padding steps have decay 1 and beta 0, which leaves
        # the state exactly as it was, so every final state is the state after its last real token
        starts, lens = _seq_bounds(spec, cu_seqlens, dev)
        tmax = int(lens.max()) if spec.N else 0
        if tmax == 0:
            return (out, state, all_states) if return_all_states else (out, state)
        steps = torch.arange(tmax, device=dev)
        valid = steps[None, :] < lens[:, None]  # [N, Tmax]
        rows = torch.where(valid, starts[:, None] + steps[None, :], 0).reshape(-1)  # [N*Tmax]
        pad = (spec.N, tmax)

        def take(x: Tensor) -> Tensor:
            return x[0].index_select(0, rows).unflatten(0, pad)  # [N, Tmax, ...]

        mask = valid.to(acc)  # [N, Tmax]
        mshape = mask.view(*pad, *([1] * (g.dim() - 2)))  # [N, Tmax, 1(, 1)]
        qf, kf = _prep_qk(take(q), take(k), acc, scale, l2norm_qk)  # [N, Tmax, Hk, K]
        decay = (take(g).to(acc) * mshape).exp()  # [N, Tmax, Hv(, K)]
        bf = take(beta).to(acc) * mask[..., None]  # [N, Tmax, Hv]
        o_pad = torch.empty(*pad, Hv, V, dtype=q.dtype, device=dev)  # [N, Tmax, Hv, V]
        st_pad = torch.empty(*pad, Hv, K, V, dtype=acc, device=dev) if return_all_states else None
        _recurrent_loop(spec, qf, kf, take(v), decay, bf, state, o_pad, st_pad)
        keep = valid.reshape(-1).nonzero().squeeze(1)  # [T] padded rows that hold real tokens
        dst = rows.index_select(0, keep)  # [T] their packed positions
        out[0].index_copy_(0, dst, o_pad.flatten(0, 1).index_select(0, keep))
        if return_all_states:
            all_states[0].index_copy_(0, dst, st_pad.flatten(0, 1).index_select(0, keep))
    return (out, state, all_states) if return_all_states else (out, state)


def _key_head_of(spec: _Spec, device) -> Tensor:
    """[Hv] index of the q/k head that each value head reads."""
    h = torch.arange(spec.Hv, device=device)
    return h // spec.R if spec.head_map == "grouped" else h % spec.Hk


def _recurrent_loop(spec, qf, kf, v, decay, bf, state, out, all_states):
    """qf, kf [b, t, Hk, K] (prepared); v [b, t, Hv, V]; decay = exp(g) [b, t, Hv(, K)]; bf [b, t, Hv];
    state [b, Hv, K, V] (contiguous) updated in place; writes out [b, t, Hv, V] and all_states
    [b, t, Hv, K, V]. Time-major per-step operands so each step is a handful of in-place batched ops."""
    b, t = qf.shape[:2]
    Hv, K, V, acc = spec.Hv, spec.K, spec.V, spec.acc
    bh = b * Hv
    idx = _key_head_of(spec, qf.device)  # [Hv]
    qx = qf.index_select(2, idx).transpose(0, 1).reshape(t, bh, 1, K)  # [t, b*Hv, 1, K]
    kx = kf.index_select(2, idx).transpose(0, 1).reshape(t, bh, K)  # [t, b*Hv, K]
    vx = v.to(acc).transpose(0, 1).reshape(t, bh, 1, V)  # [t, b*Hv, 1, V]
    bx = bf.transpose(0, 1).reshape(t, bh, 1, 1)  # [t, b*Hv, 1, 1]
    dx = decay.transpose(0, 1).reshape(t, bh, K if spec.kda else 1, 1)  # [t, b*Hv, K|1, 1]
    s = state.view(bh, K, V)  # [b*Hv, K, V]
    ox = torch.empty(t, bh, 1, V, dtype=acc, device=qf.device)  # [t, b*Hv, 1, V]
    for i in range(t):
        s.mul_(dx[i])  # decay
        u = torch.baddbmm(vx[i], kx[i].unsqueeze(1), s, alpha=-1.0).mul_(bx[i])  # [b*Hv, 1, V]: beta (v - S^T k)
        s.baddbmm_(kx[i].unsqueeze(2), u)  # S += k u^T
        torch.bmm(qx[i], s, out=ox[i])  # [b*Hv, 1, V]: S^T q
        if all_states is not None:
            all_states[:, i] = state
    out.copy_(ox.view(t, b, Hv, V).transpose(0, 1))  # [b, t, Hv, V]


# ---------------------------------------------------------------------------------------------------
# chunked form
# ---------------------------------------------------------------------------------------------------

def _segsum(x: Tensor) -> Tensor:
    """x [..., L] -> [..., L, L] with out[i, j] = sum_{j<m<=i} x[m] for i >= j and -inf above the
    diagonal; each entry is a direct masked sum, so exp(out) is exact even for huge |x|."""
    L = x.shape[-1]
    rep = x.unsqueeze(-1).expand(*x.shape, L)  # [..., L(m), L(j)]: rep[m, j] = x[m]
    strict = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)  # [L, L]: m > j
    out = rep.masked_fill(~strict, 0.0).cumsum(-2)  # [..., L(i), L(j)]
    lower = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(0)  # [L, L]: i >= j
    return out.masked_fill(~lower, float("-inf"))


def _suffix_excl(x: Tensor, dim: int) -> Tensor:
    """out[j] = sum_{m > j} x[m] along `dim` (a reversed cumulative sum, shifted: no subtraction)."""
    rev = x.flip(dim).cumsum(dim).flip(dim)  # sum_{m >= j}
    n = x.shape[dim]
    return torch.cat([rev.narrow(dim, 1, n - 1), torch.zeros_like(rev.narrow(dim, 0, 1))], dim)


KDA_FACTOR_LIMIT = 60.0  # |in-sub-block log decay| below which exp(+-x) is safely inside fp32's normal range


def _kda_pairs(qk: Tensor, k: Tensor, g: Tensor, blk: int) -> Tensor:
    """Per-channel decayed products within a chunk.

    qk [2, ..., C, K] (query-side rows: q and k, broadcastable over the head dims of g),
    k [..., C, K] (key side), g [..., C, K] log gates. Returns P [2, ..., C, C] with
    P[:, i, j] = sum_c qk[i, c] k[j, c] exp(sum_{j<m<=i} g[m, c]) for j <= i, 0 above the diagonal.

    Pairs in different sub-blocks factor exactly through the last position r of the key's sub-block
    (both factors <= 1). Pairs inside a sub-block factor through the position before the sub-block
    when every in-block decay sum stays within +-KDA_FACTOR_LIMIT (then exp(x) and exp(-x) are both
    normal fp32 numbers and the product is accurate); otherwise they are summed per channel with a
    loop over the blk diagonals, each term a direct sum of gates.
    """
    C = g.shape[-2]
    nb = C // blk
    out = torch.zeros(*torch.broadcast_shapes(qk.shape[:-1], (1,) + g.shape[:-1]), C,
                      dtype=g.dtype, device=g.device)  # [2, ..., C, C]
    for jb in range(nb - 1):  # key sub-block jb against every later row
        lo, r = jb * blk, (jb + 1) * blk  # key rows lo:r; query rows r:C
        q_side = qk[..., r:, :] * g[..., r:, :].cumsum(-2).exp()  # [2, ..., C-r, K]: e^{g(r_J, i]}
        k_side = k[..., lo:r, :] * _suffix_excl(g[..., lo:r, :], -2).exp()  # [..., blk, K]: e^{g(j, r_J]}
        out[..., r:, lo:r] = q_side @ k_side.transpose(-1, -2)  # [2, ..., C-r, blk]
    local = g.unflatten(-2, (nb, blk)).cumsum(-2)  # [..., nb, blk, K]: sum of g from the sub-block start
    blocks = out.unflatten(-1, (nb, blk)).unflatten(-3, (nb, blk))  # [2, ..., nb, blk, nb, blk] view
    diag = torch.diagonal(blocks, dim1=-4, dim2=-2)  # [2, ..., blk, blk, nb]: the diagonal sub-blocks
    if bool(local.abs().amax() <= KDA_FACTOR_LIMIT):
        q_in = qk.unflatten(-2, (nb, blk)) * local.exp()  # [2, ..., nb, blk, K]
        k_in = k.unflatten(-2, (nb, blk)) * (-local).exp()  # [..., nb, blk, K]
        diag.copy_((q_in @ k_in.transpose(-1, -2)).tril().movedim(-3, -1))  # [2, ..., blk, blk, nb]
        return out
    # exact fallback: loop over the diagonals d = i - j < blk, window sums built term by term
    pos_in = torch.arange(C, device=g.device) % blk  # [C]: position inside its sub-block
    win = torch.zeros_like(g)  # [..., C, K]: sum_{i-d<m<=i} g[m]
    for d in range(blk):
        if d > 0:
            win = win[..., 1:, :] + g[..., 1: C - d + 1, :]  # [..., C-d, K]: add g[i-d+1]
        term = (qk[..., d:, :] * (k[..., : C - d, :] * win.exp())).sum(-1)  # [2, ..., C-d]: j = i - d
        term = term * (pos_in[d:] >= d).to(g.dtype)  # [2, ..., C-d]: same sub-block only
        out.diagonal(offset=-d, dim1=-2, dim2=-1).add_(term)  # crossing pairs hold the off-block value
    return out


def _unit_lower_inverse(a: Tensor, blk: int = 16) -> Tensor:
    """(I + a)^-1 for a strictly lower-triangular a [..., C, C] (diagonal and upper part must be 0).

    Forward substitution inside blk x blk diagonal blocks (all blocks at once), then block rows:
    T[I, :I] = -T[I, I] (a[I, :I] T[:I, :I]). Everything but the blk-step loop is batched matmuls."""
    C = a.shape[-1]
    blk = min(blk, C)
    pad = (-C) % blk
    if pad:
        a = torch.nn.functional.pad(a, (0, pad, 0, pad))  # [..., Cp, Cp]: the identity beyond C
    cp = C + pad
    nb = cp // blk
    blocks = a.unflatten(-1, (nb, blk)).unflatten(-3, (nb, blk))  # [..., nb, blk, nb, blk] view
    blocks = torch.diagonal(blocks, dim1=-4, dim2=-2)  # [..., blk, blk, nb]
    blocks = blocks.movedim(-1, -3)  # [..., nb, blk, blk]: the diagonal blocks
    tb = torch.zeros_like(blocks)  # [..., nb, blk, blk]
    for i in range(blk):  # row i: e_i - a[i, :i] T[:i, :]
        row = -(blocks[..., i: i + 1, :i] @ tb[..., :i, :])  # [..., nb, 1, blk]
        row[..., 0, i] += 1.0
        tb[..., i: i + 1, :] = row
    t = torch.zeros_like(a)  # [..., Cp, Cp]
    for bi in range(nb):
        r = slice(bi * blk, (bi + 1) * blk)
        t[..., r, r] = tb[..., bi, :, :]
        if bi:
            t[..., r, : bi * blk] = -(tb[..., bi, :, :] @ (a[..., r, : bi * blk] @ t[..., : bi * blk, : bi * blk]))
    return t[..., :C, :C] if pad else t


def gated_delta_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    head_map: str = "grouped",
    l2norm_qk: bool = False,
    return_all_states: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: int = 64,
    kda_block: int = 16,
    slab_tokens: Optional[int] = None,
):
    """Chunkwise-parallel gated delta rule for prefill; same arguments and results as
    `gated_delta_recurrent` (up to rounding), plus:

    chunk_size: tokens per chunk C (the (I + A) solve is C x C); kda_block: sub-block size for KDA gates
    (must divide chunk_size; see the module docstring); slab_tokens: how many tokens' worth of chunks
    have their intra-chunk terms materialised at once (bounds the working memory; default 4096, 1024
    with return_all_states). Sequences are cut into chunks independently (each is padded to a multiple
    of C on its own), so varlen batches cost the sum of their chunk counts, not N * the longest.
    """
    spec = _Spec(q, k, v, g, beta, initial_state, head_map, cu_seqlens)
    scale = spec.K ** -0.5 if scale is None else float(scale)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    C = int(chunk_size)
    blk = min(int(kda_block), C)
    if C % blk:
        raise ValueError(f"kda_block ({kda_block}) must divide chunk_size ({chunk_size})")
    acc, dev = spec.acc, q.device
    B, T, Hk, Hv, K, V, R, hm = spec.B, spec.T, spec.Hk, spec.Hv, spec.K, spec.V, spec.R, spec.head_map
    state = torch.zeros(spec.N, Hv, K, V, dtype=acc, device=dev)  # [N, Hv, K, V], contiguous
    if initial_state is not None:
        state.copy_(initial_state)
    out = torch.empty(B, T, Hv, V, dtype=q.dtype, device=dev)  # [B, T, Hv, V]
    all_states = torch.empty(B, T, Hv, K, V, dtype=acc, device=dev) if return_all_states else None
    result = (out, state, all_states) if return_all_states else (out, state)
    if T == 0 or spec.N == 0:
        return result
    starts, lens = _seq_bounds(spec, cu_seqlens, dev)
    nchunks = (lens + C - 1) // C  # [N]
    nck = nchunks.tolist()
    max_chunks = max(nck)
    if slab_tokens is None:
        slab_tokens = 1024 if return_all_states else 4096

    # token rows of the flattened batch; the views keep the caller's strides (no copy for views)
    qr, kr, vr, gr = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), g.flatten(0, 1)  # [B*T, ...]
    br = beta.flatten(0, 1) if beta is not None else None  # [B*T, Hv]
    out_r = out.view(B * T, Hv, V)  # [B*T, Hv, V]
    st_r = all_states.view(B * T, Hv, K, V) if return_all_states else None  # [B*T, Hv, K, V]
    ar_c = torch.arange(C, device=dev)
    lower_strict = torch.ones(C, C, dtype=torch.bool, device=dev).tril(-1)  # [C, C]

    c0 = 0
    while c0 < max_chunks:
        act_list = [i for i, n in enumerate(nck) if n > c0]
        n = len(act_list)
        s = max(1, min(max_chunks - c0, slab_tokens // (C * n)))  # chunks per sequence in this slab
        act = torch.tensor(act_list, device=dev)  # [n]
        # slab layout is step-major, [s, n, C, ...]: the chunks of step j of all active sequences are
        # one contiguous block for the sequential part
        steps = (c0 + torch.arange(s, device=dev))[:, None, None] * C + ar_c  # [s, 1, C] offsets
        valid = steps < lens.index_select(0, act)[None, :, None]  # [s, n, C]
        rows = torch.where(valid, starts.index_select(0, act)[None, :, None] + steps, 0).reshape(-1)  # [s*n*C]
        shp = (s, n, C)

        def take(x: Tensor) -> Tensor:
            return x.index_select(0, rows).unflatten(0, shp)  # [s, n, C, ...]

        mask = valid.to(acc)  # [s, n, C]
        qf, kf = _prep_qk(take(qr), take(kr), acc, scale, l2norm_qk)  # [s, n, C, Hk, K]
        qh = qf.permute(0, 1, 3, 2, 4).contiguous().unsqueeze(3)  # [s, n, Hk, 1, C, K]
        kh = kf.permute(0, 1, 3, 2, 4).contiguous().unsqueeze(3)  # [s, n, Hk, 1, C, K]
        vh = _split_heads(take(vr).to(acc), 3, Hk, R, hm).permute(0, 1, 3, 4, 2, 5)  # [s, n, Hk, R, C, V]
        bt = take(br).to(acc) * mask[..., None] if br is not None else mask[..., None].expand(*shp, Hv)
        bh = _split_heads(bt, 3, Hk, R, hm).permute(0, 1, 3, 4, 2)[..., None]  # [s, n, Hk, R, C, 1]
        if spec.kda:
            gt = take(gr).to(acc) * mask[..., None, None]  # [s, n, C, Hv, K]; padding: no decay
            gh = _split_heads(gt, 3, Hk, R, hm).permute(0, 1, 3, 4, 2, 5)  # [s, n, Hk, R, C, K]
            gam = gh.cumsum(-2)  # [s, n, Hk, R, C, K]: sum_{m<=i} g[m]
            e_in = gam.exp()  # [s, n, Hk, R, C, K]
            e_out = _suffix_excl(gh, -2).exp()  # [s, n, Hk, R, C, K]: exp(sum_{m>j} g[m])
            d_last = gam[..., -1, :].exp()[..., None]  # [s, n, Hk, R, K, 1]
            attn, amat = _kda_pairs(torch.stack([qh, kh]), kh, gh, blk)  # 2 x [s, n, Hk, R, C, C]
            amat = amat * bh  # [s, n, Hk, R, C, C]; only the strict lower part is used
        else:
            gt = take(gr).to(acc) * mask[..., None]  # [s, n, C, Hv]
            gh = _split_heads(gt, 3, Hk, R, hm).permute(0, 1, 3, 4, 2)  # [s, n, Hk, R, C]
            gam = gh.cumsum(-1)  # [s, n, Hk, R, C]
            e_in = gam.exp()[..., None]  # [s, n, Hk, R, C, 1]
            e_out = _suffix_excl(gh, -1).exp()[..., None]  # [s, n, Hk, R, C, 1]
            d_last = gam[..., -1].exp()[..., None, None]  # [s, n, Hk, R, 1, 1]
            dec = _segsum(gh).exp()  # [s, n, Hk, R, C, C]: exp(sum_{j<m<=i} g[m]), 0 above diagonal
            attn = (qh @ kh.transpose(-1, -2)) * dec  # [s, n, Hk, R, C, C]
            amat = (kh @ kh.transpose(-1, -2)) * dec * bh  # [s, n, Hk, R, C, C]
            del dec
        tinv = _unit_lower_inverse(amat.masked_fill_(~lower_strict, 0.0))  # [s, n, Hk, R, C, C]: (I + A)^-1
        u = tinv @ (vh * bh)  # [s, n, Hk, R, C, V]: U0; becomes U = U0 - W S0 in the scan
        w = tinv @ (kh * (e_in * bh))  # [s, n, Hk, R, C, K]
        k_out = (kh * e_out).transpose(-1, -2)  # [s, n, Hk, R, K, C] (a transposed view)
        del tinv, amat

        # sequential part: only the products with the carried state. s_in[j] is chunk j's initial
        # state, s_in[s] the slab's final state.
        s_in = torch.empty(s + 1, n, Hk, R, K, V, dtype=acc, device=dev)  # [s+1, n, Hk, R, K, V]
        s_in[0] = _split_heads(state.index_select(0, act), 1, Hk, R, hm)  # [n, Hk, R, K, V]
        u3, w3 = u.flatten(1, 3), w.flatten(1, 3)  # [s, n*Hk*R, C, V], [s, n*Hk*R, C, K]
        k3, s3 = k_out.flatten(1, 3), s_in.flatten(1, 3)  # [s, n*Hk*R, K, C], [s+1, n*Hk*R, K, V]
        for j in range(s):  # three batched ops per chunk
            u3[j].baddbmm_(w3[j], s3[j], alpha=-1.0)  # U = U0 - W S
            torch.mul(s_in[j], d_last[j], out=s_in[j + 1])  # decay over the whole chunk
            s3[j + 1].baddbmm_(k3[j], u3[j])  # + (decayed K)^T U
        state.index_copy_(0, act, _merge_heads(s_in[s], 1, hm))  # [n, Hv, K, V]
        s_in = s_in[:s]  # [s, n, Hk, R, K, V]
        o_h = torch.matmul(qh * e_in, s_in)  # [s, n, Hk, R, C, V]: the reads of the chunk states
        o_h.add_(attn @ u)  # [s, n, Hk, R, C, V]: plus the intra-chunk part

        keep = valid.reshape(-1).nonzero().squeeze(1)  # rows of this slab that are real tokens
        dst = rows.index_select(0, keep)
        o_tok = _merge_heads(o_h.permute(0, 1, 4, 2, 3, 5), 3, hm)  # [s, n, C, Hv, V]
        out_r.index_copy_(0, dst, o_tok.flatten(0, 2).index_select(0, keep).to(out.dtype))
        if return_all_states:  # replay the chunk's updates from its initial state, all chunks at once
            dpos = gh.exp()  # [s, n, Hk, R, C(, K)]
            cur = s_in  # [s, n, Hk, R, K, V]
            per_tok = torch.empty(s, n, C, Hk, R, K, V, dtype=acc, device=dev)
            for i in range(C):
                di = dpos[..., i, :, None] if spec.kda else dpos[..., i, None, None]  # [s, n, Hk, R, K|1, 1]
                cur = cur * di + kh[..., i, :, None] * u[..., i, None, :]  # [s, n, Hk, R, K, V]
                per_tok[:, :, i] = cur
            per_tok = _merge_heads(per_tok, 3, hm)  # [s, n, C, Hv, K, V]
            st_r.index_copy_(0, dst, per_tok.flatten(0, 2).index_select(0, keep))
        c0 += s
    return result
