"""Depthwise causal conv1d (the Mamba-2 short convolution) with a rolling state.

Channels-last layout: x is [b, T, C]; weight is [C, K]; the state keeps the
``K - 1`` most recent inputs as [b, C, K - 1] (oldest first). No activation is
applied unless ``silu=True`` (the callers' SiLU fused into the output).

Varlen prefill: with ``cu_seqlens`` ([n + 1] int, cu_seqlens[0] = 0, cu_seqlens[-1] = T) x is one
packed row (b = 1) of n sequences; sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1] and starts from
``conv_state[i]`` ([n, C, K - 1]). A sequence shorter than K - 1 keeps part of its old window in its
new state; an empty one keeps its state. Decode can update a state pool in place: with
``state_indices`` [b], ``conv_state`` is [num_slots, C, K - 1] and row i shifts slot state_indices[i]
(the indices must be distinct).

backend: "auto" (the Triton kernels of `triton_conv1d` on CUDA tensors when triton is importable, else
torch), "torch" or "triton". The torch path computes in x.dtype; Triton accumulates in fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import backend as _backend
from .varlen import host_bounds, num_sequences

Tensor = torch.Tensor

__all__ = ["causal_conv1d", "causal_conv1d_step", "conv_states_after_each", "triton_available"]

def triton_available() -> bool:
    return _backend.triton_available("triton_conv1d")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    return _backend.use_triton(backend, x, "triton_conv1d")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    conv_state: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    silu: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Causal depthwise conv over a sequence.

    out[:, t, c] = bias[c] + sum_j weight[c, j] * xpad[:, t + j, c], where
    xpad = concat(previous K-1 inputs from ``conv_state`` (zeros if None), x).
    Returns (out [b, T, C], new_state [b, C, K-1]), both in x.dtype; with ``silu`` out is SiLU(out).
    With ``cu_seqlens`` [n + 1] (b = 1) each packed sequence continues its own ``conv_state[i]``
    and new_state is [n, C, K-1]. x may be a strided view.
    """
    b, T, Cn = x.shape
    K = weight.shape[-1]
    if weight.shape != (Cn, K):
        raise ValueError(f"weight must be [{Cn}, K], got {tuple(weight.shape)}")
    n = num_sequences(b, cu_seqlens)
    if conv_state is not None and tuple(conv_state.shape) != (n, Cn, K - 1):
        raise ValueError(f"conv_state must be [{n}, {Cn}, {K - 1}], got {tuple(conv_state.shape)}")
    if _use_triton(backend, x):
        from .triton_conv1d import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, conv_state, cu_seqlens, silu)
    if cu_seqlens is not None:
        return _varlen_torch(x, weight, bias, conv_state, cu_seqlens, silu)
    out, new_state = _conv_torch(x, weight, bias, conv_state)
    return (F.silu(out) if silu else out), new_state


def _conv_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Optional[Tensor]):
    b, T, Cn = x.shape
    K = weight.shape[-1]
    w = weight.to(x.dtype)
    if conv_state is None:
        prev = x.new_zeros(b, K - 1, Cn)  # [b, K-1, C]
    else:
        prev = conv_state.to(x.dtype).transpose(1, 2)  # [b, K-1, C]
    xpad = torch.cat([prev, x], dim=1)  # [b, T+K-1, C]

    out = xpad[:, K - 1 :] * w[:, K - 1]  # [b, T, C]
    for j in range(K - 1):
        out.addcmul_(xpad[:, j : j + T], w[:, j])  # [b, T, C]
    if bias is not None:
        out = out + bias.to(x.dtype)  # [b, T, C]
    new_state = xpad[:, T:].transpose(1, 2).contiguous()  # [b, C, K-1]
    return out, new_state


def _varlen_torch(x, weight, bias, conv_state, cu_seqlens, silu):
    """Reference for packed sequences: the dense path once per sequence (syncs on cu_seqlens)."""
    cu = host_bounds(cu_seqlens, x.shape[1])
    outs, states = [], []
    for i in range(len(cu) - 1):
        st = conv_state[i : i + 1] if conv_state is not None else None  # [1, C, K-1]
        o, s = _conv_torch(x[:, cu[i] : cu[i + 1]], weight, bias, st)
        outs.append(o)
        states.append(s)
    out = torch.cat(outs, dim=1) if outs else x[:, :0].to(x.dtype)  # [1, T, C]
    new_state = (torch.cat(states, dim=0) if states
                 else x.new_empty(0, x.shape[-1], weight.shape[-1] - 1))  # [n, C, K-1]
    return (F.silu(out) if silu else out), new_state


def causal_conv1d_step(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    conv_state: Tensor,
    state_indices: Optional[Tensor] = None,
    silu: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One token: x [b, C]; conv_state [b, C, K-1] is shifted in place. Returns [b, C] (SiLU'd with ``silu``).

    With ``state_indices`` [b] (distinct), conv_state is a pool [num_slots, C, K-1] and row i uses and
    shifts slot state_indices[i]; other slots are untouched.
    """
    K = weight.shape[-1]
    b, Cn = x.shape
    rows = b if state_indices is None else conv_state.shape[0]
    if tuple(conv_state.shape) != (rows, Cn, K - 1):
        raise ValueError(f"conv_state must be [{rows}, {Cn}, {K - 1}], got {tuple(conv_state.shape)}")
    if state_indices is not None and tuple(state_indices.shape) != (b,):
        raise ValueError(f"state_indices must be [{b}], got {tuple(state_indices.shape)}")
    if _use_triton(backend, x):
        from .triton_conv1d import causal_conv1d_step_triton
        return causal_conv1d_step_triton(x, weight, bias, conv_state, state_indices, silu)
    if state_indices is None:
        out = _step_torch(x, weight, bias, conv_state)
    else:
        idx = state_indices.to(device=conv_state.device, dtype=torch.long)
        st = conv_state[idx]  # [b, C, K-1] gathered copy
        out = _step_torch(x, weight, bias, st)
        conv_state[idx] = st
    return F.silu(out) if silu else out


def _step_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv_state: Tensor) -> Tensor:
    K = weight.shape[-1]
    w = weight.to(x.dtype)
    st = conv_state.to(x.dtype)  # [b, C, K-1]
    out = x * w[:, K - 1]  # [b, C]
    for j in range(K - 1):
        out.addcmul_(st[:, :, j], w[:, j])  # [b, C]
    if bias is not None:
        out = out + bias.to(x.dtype)  # [b, C]
    if K > 1:
        shifted = torch.cat([conv_state[:, :, 1:], x.to(conv_state.dtype).unsqueeze(-1)], dim=-1)  # [b, C, K-1]
        conv_state.copy_(shifted)
    return out


def conv_states_after_each(x: Tensor, conv_state: Tensor) -> Tensor:
    """The rolling state after each position of x [b, T, C], starting from conv_state [b, C, K-1]:
    [b, T, C, K-1] (what `causal_conv1d_step` would hold after each token; for speculative rollback)."""
    K1 = conv_state.shape[-1]
    xpad = torch.cat([conv_state.transpose(1, 2), x.to(conv_state.dtype)], dim=1)  # [b, K-1+T, C]
    if K1 == 0:
        return xpad.new_zeros(x.shape[0], x.shape[1], x.shape[2], 0)
    return xpad.unfold(1, K1, 1)[:, 1:]  # [b, T, C, K-1]: window j+1 ends at position j
