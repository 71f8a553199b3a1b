"""One decode token of a Mamba-2 mixer (conv step, SiLU, softplus'd dt, SSM update, read-out) fused into one
native call that updates the state pool's slots in place (hylm/ops/csrc/mamba_step.c). The reference is the
composition of `conv1d.causal_conv1d_step` and `ssd.ssd_step` the mixer runs otherwise."""

from __future__ import annotations

import math

import torch

from . import native
from .linear import fp32_cpu, native_weight, weight_layout


MAX_CONV_KERNEL = 16  # CONV_MAX_KERNEL in hylm/ops/csrc/mamba_step.c


def native_supported(xbc: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor) -> bool:
    return (xbc.device.type == "cpu" and xbc.dtype == torch.float32 and conv_pool.dtype == torch.float32
            and conv_pool.shape[-1] < MAX_CONV_KERNEL
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


class NativeMambaBlock:
    """A whole Mamba-2 block for a few tokens per call (hylm_mamba_rows in hylm/ops/csrc/decode_blocks.c):
    x + out_proj(gated_norm(mamba_decode_step(in_proj(rmsnorm(x))), z)), its weights and constants (A = -exp(A_log),
    the squeezed conv weight) prepared once. Build it with `prepare_native_mamba_block`."""

    def __init__(self, norm_weight: torch.Tensor, eps: float, in_proj: torch.Tensor, out_proj: torch.Tensor,
                 conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor,
                 D: torch.Tensor | None, dt_limits: tuple[float, float], gnorm_weight: torch.Tensor, gnorm_eps: float,
                 num_heads: int, head_dim: int, n_groups: int, state_size: int):
        f32 = torch.float32
        w = conv_weight.reshape(conv_weight.shape[0], -1).to(f32).contiguous()  # [C, K]
        cb = conv_bias.to(f32).contiguous() if conv_bias is not None else None
        dtb = dt_bias.to(f32).contiguous()
        a = (-torch.exp(A_log.float())).contiguous()  # [H]
        d = D.to(f32).contiguous() if D is not None else None
        in_proj, out_proj = native_weight(in_proj), native_weight(out_proj)  # panels where that reads faster
        self.keep = (norm_weight, in_proj, out_proj, w, cb, dtb, a, d, gnorm_weight)  # alive while in use
        self.conv_dim, self.kernel = w.shape
        self.heads, self.head_dim, self.state_size = num_heads, head_dim, state_size
        lo, hi = dt_limits

        self._kernel = native.library().hylm_mamba_rows
        self._weights = (norm_weight.data_ptr(), float(eps), in_proj.tensor.data_ptr(), in_proj.layout,
                         out_proj.tensor.data_ptr(), out_proj.layout)
        self._constants = (w.data_ptr(), cb.data_ptr() if cb is not None else None, self.kernel, dtb.data_ptr(),
                           a.data_ptr(), d.data_ptr() if d is not None else None, float(lo),
                           float(hi if hi < math.inf else 3.0e38))
        self._norm = (gnorm_weight.data_ptr(), float(gnorm_eps), n_groups)
        self._groups = n_groups

    def __call__(self, x: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor, slots: torch.Tensor,
                 tokens: int, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [b * tokens, D] fp32 (packed by sequence), pools [S, C, K-1] and [S, H, P, N] fp32 contiguous, slots
        [b] int64 distinct -> (out [b * tokens, D], and with keep_states the states after each token, conv
        [b, tokens, C, K-1] and ssm [b, tokens, H, P, N], else None, None)."""
        x = x.contiguous()  # [R, D]
        out = torch.empty_like(x)  # [R, D]
        conv_after, ssm_after = self.kept_states(slots.shape[0], tokens) if keep_states else (None, None)
        self.run(self.args(x, out, conv_pool, ssm_pool, slots, tokens, conv_after, ssm_after))
        return out, conv_after, ssm_after

    def kept_shapes(self, b: int, tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of the states after every token: conv [b, tokens, C, K-1], ssm [b, tokens, H, P, N]."""
        return (b, tokens, self.conv_dim, self.kernel - 1), (b, tokens, self.heads, self.head_dim, self.state_size)

    def kept_states(self, b: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for the states after every token (`kept_shapes`)."""
        conv, ssm = self.kept_shapes(b, tokens)
        return torch.empty(conv), torch.empty(ssm)

    def args(self, x: torch.Tensor, out: torch.Tensor, conv_pool: torch.Tensor, ssm_pool: torch.Tensor,
             slots: torch.Tensor, tokens: int, conv_after: torch.Tensor | None, ssm_after: torch.Tensor | None
             ) -> tuple:
        """The kernel's arguments for `__call__`'s inputs (x contiguous, out [R, D] not x), for `run`: a forward
        of several blocks binds them all before it runs any."""
        return (x.data_ptr(), x.shape[0], x.shape[1], *self._weights, conv_pool.data_ptr(), *self._constants,
                ssm_pool.data_ptr(), slots.data_ptr(), slots.shape[0], tokens, self.conv_dim, self.heads,
                self.head_dim, self._groups, self.state_size, *self._norm,
                conv_after.data_ptr() if conv_after is not None else None,
                ssm_after.data_ptr() if ssm_after is not None else None, out.data_ptr())

    def run(self, args: tuple) -> None:
        rc = self._kernel(*args)
        if rc != 0:
            raise RuntimeError(f"native Mamba block refused {args[1]} rows (code {rc})")


def prepare_native_mamba_block(norm_weight: torch.Tensor, eps: float, in_proj: torch.Tensor, out_proj: torch.Tensor,
                               conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                               A_log: torch.Tensor, D: torch.Tensor | None, dt_limits: tuple[float, float],
                               gnorm_weight: torch.Tensor, gnorm_eps: float, num_heads: int, head_dim: int,
                               n_groups: int, state_size: int) -> NativeMambaBlock | None:
    """A NativeMambaBlock for fp32 CPU weights (projections row- or column-major), or None."""
    mats = (in_proj, out_proj)
    vecs = (norm_weight, gnorm_weight)
    if not native.available() or not fp32_cpu(*mats, *vecs):
        return None
    if not all(m.dim() == 2 and weight_layout(m) is not None for m in mats):
        return None
    if not all(v.is_contiguous() for v in vecs) or conv_weight.device.type != "cpu" \
            or conv_weight.shape[-1] > MAX_CONV_KERNEL:
        return None
    return NativeMambaBlock(norm_weight, eps, in_proj, out_proj, conv_weight, conv_bias, dt_bias, A_log, D, dt_limits,
                            gnorm_weight, gnorm_eps, num_heads, head_dim, n_groups, state_size)
