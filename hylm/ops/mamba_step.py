"""One decode token of a Mamba-2 mixer (conv step, SiLU, softplus'd dt, SSM update, read-out) fused into one
native call that updates the state pool's slots in place (hylm/ops/csrc/mamba_step.c). The reference is the
composition of `conv1d.causal_conv1d_step` and `ssd.ssd_step` the mixer runs otherwise."""

from __future__ import annotations

import math

import torch

from . import native


def native_supported(xbc: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor) -> bool:
    return (xbc.device.type == "cpu" and xbc.dtype == torch.float32 and conv_pool.dtype == torch.float32
            and ssm_pool.dtype == torch.float32 and conv_pool.is_contiguous() and ssm_pool.is_contiguous()
            and xbc.stride(-1) == 1 and native.available())


def mamba_decode_step(xbc: torch.Tensor, dt: torch.Tensor, conv_pool: torch.Tensor, conv_weight: torch.Tensor,
                      conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor | None,
                      dt_limits: tuple[float, float], ssm_pool: torch.Tensor, slots: torch.Tensor,
                      n_groups: int, tokens: int = 1, keep_states: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`tokens` new tokens for each of b sequences. xbc [b * tokens, C] and dt [b * tokens, H] (packed by
    sequence; rows may be strided views of the in_proj output), conv_pool [S, C, K-1], conv_weight [C, K],
    ssm_pool [S, H, P, N], slots [b] distinct. Updates the pools' slots in place to the state after the last
    token and returns (y [b * tokens, H, P] fp32 (before the gated norm), and with keep_states the states after
    each token: conv [b, tokens, C, K-1], ssm [b, tokens, H, P, N], else None, None)."""
    rows, c = xbc.shape
    b = slots.shape[0]
    h, p, n = ssm_pool.shape[1:]
    k = conv_weight.shape[-1]
    if rows != b * tokens or dt.shape != (rows, h) or dt.stride(-1) != 1 or conv_pool.shape[1:] != (c, k - 1):
        raise ValueError("mamba_decode_step: inconsistent shapes")
    f32 = torch.float32
    w = conv_weight.to(f32).contiguous()
    cb = conv_bias.to(f32).contiguous() if conv_bias is not None else None
    dtb, a = dt_bias.to(f32).contiguous(), A.to(f32).contiguous()
    d = D.to(f32).contiguous() if D is not None else None
    idx = slots.to(torch.int64).contiguous()
    work = torch.empty(rows, c, dtype=f32)  # [b * t, C]
    y = torch.empty(rows, h, p, dtype=f32)  # [b * t, H, P]
    conv_after = torch.empty(b, tokens, c, k - 1, dtype=f32) if keep_states else None
    ssm_after = torch.empty(b, tokens, h, p, n, dtype=f32) if keep_states else None
    lo, hi = dt_limits
    rc = native.library().hylm_mamba_steps(
        xbc.data_ptr(), xbc.stride(0), dt.data_ptr(), dt.stride(0), conv_pool.data_ptr(), w.data_ptr(),
        cb.data_ptr() if cb is not None else None, k, dtb.data_ptr(), a.data_ptr(),
        d.data_ptr() if d is not None else None, float(lo), float(hi if hi < math.inf else 3.0e38),
        ssm_pool.data_ptr(), idx.data_ptr(), b, tokens, c, h, p, n_groups, n, work.data_ptr(), y.data_ptr(),
        conv_after.data_ptr() if keep_states else None, ssm_after.data_ptr() if keep_states else None)
    if rc != 0:
        raise ValueError(f"mamba_decode_step: kernel refused C={c}, H={h}, P={p}, groups={n_groups}, N={n}")
    return y, conv_after, ssm_after
