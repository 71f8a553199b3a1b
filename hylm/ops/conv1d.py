"""Depthwise causal conv1d (the Mamba-2 short convolution) with a rolling state.

Channels-last layout: x is [b, T, C]; weight is [C, K]; the state keeps the
``K - 1`` most recent inputs as [b, C, K - 1] (oldest first). No activation is
applied here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["causal_conv1d", "causal_conv1d_step", "conv_states_after_each"]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    conv_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal depthwise conv over a sequence.

    out[:, t, c] = bias[c] + sum_j weight[c, j] * xpad[:, t + j, c], where
    xpad = concat(previous K-1 inputs from ``conv_state`` (zeros if None), x).
    Returns (out [b, T, C], new_state [b, C, K-1]); computed in x.dtype.
    """
    b, T, Cn = x.shape
    K = weight.shape[-1]
    if weight.shape != (Cn, K):
        raise ValueError(f"weight must be [{Cn}, K], got {tuple(weight.shape)}")
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


def causal_conv1d_step(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    conv_state: Tensor,
) -> Tensor:
    """One token: x [b, C]; conv_state [b, C, K-1] is shifted in place. Returns [b, C]."""
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
