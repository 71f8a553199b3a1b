"""NVFP4 (NVIDIA ModelOpt) weights: 4-bit E2M1 values in blocks of 16, an E4M3 scale per block and
an FP32 scale per tensor, kept packed in memory and dequantised tile by tile when used.

Layout, for a weight W [out, in] (in a multiple of 16):
  packed  uint8 [out, in/2]            element 2k in the LOW nibble, element 2k+1 in the HIGH nibble
  scales  float8_e4m3fn [out, in/16]   one scale per block of 16 consecutive elements of a row
  global  float32 scalar               amax(|W|) / (6 * 448)  (ModelOpt's `weight_scale_2`)
E2M1 code (4 bits): bit 3 = sign, bits 0-2 index [0, 0.5, 1, 1.5, 2, 3, 4, 6].

Dequantisation: W[i, j] = (E2M1(code) * float(scale[i, j // 16])) * global, in fp32, in that order: the
first product is exact (2 x 4 significant bits), so the only rounding is the multiplication by the
global scale.

Quantisation (`quantize_nvfp4`), per block of 16:
  scale = e4m3(block_amax / (6 * global))   fp32 arithmetic, then E4M3 round-to-nearest-even,
                                            saturating at 448 (see hylm.ops.fp8);
  code  = e2m1(w / (float(scale) * global)) fp32 arithmetic, then the E2M1 rounding below.
E2M1 rounding: to the nearest grid value; a value exactly halfway between two grid values goes to the
one with the EVEN code (mantissa bit 0), i.e. IEEE round-half-to-even for this 1-bit-mantissa format:
  0.25 -> 0,  0.75 -> 1,  1.25 -> 1,  1.75 -> 2,  2.5 -> 2,  3.5 -> 4,  5 -> 4;
magnitudes above 6 saturate to 6 (a block whose scale saturated at 448, or a caller-given global scale
that is too small); the sign is kept even when the magnitude rounds to 0 (-0.1 -> 0x8, i.e. -0.0,
exactly as an IEEE conversion does), so dequantise -> quantise reproduces the codes.
With ``scale_search=True`` (hylm's quantizer; the format is unchanged) each block instead takes, among that
scale and the SEARCH_STEPS E4M3 values below and one above it, the one whose dequantised block has the least
squared error: a slightly smaller scale clips the block's largest element but places the other 15 on a finer
grid, which usually wins (the same trade llama.cpp's k-quant scale search makes).
A block whose scale is 0 (an all-zero block, or one below 2^-10 * 6 * global, too small for E4M3)
encodes +0 everywhere. An all-zero tensor gets global scale 1.0 (any positive value would do).
`in` must be a multiple of 16 (ModelOpt's block size): other widths raise ValueError instead of padding,
and the quantisation policies keep such layers unquantised.
NaN or infinite weights are refused.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch

from . import backend as _backend
from .fp8 import _E4M3_VALUES_NP, _check_finite, _untranspose, e4m3_decode, tile_rows, to_e4m3

BLOCK = 16
E2M1_MAX = 6.0
# value of each 4-bit code; codes 8..15 are the negatives of 0..7 (code 8 is -0.0)
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)


def _below(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(0)))


# Magnitude m gets code = number of these boundaries strictly below m. A midpoint whose lower neighbour
# has an even code is kept as is (a tie rounds down); one whose upper neighbour is even is moved one
# float32 ulp down (a tie rounds up).
_E2M1_BOUNDS = torch.tensor([0.25, _below(0.75), 1.25, _below(1.75), 2.5, _below(3.5), 5.0], dtype=torch.float32)

# byte -> the two fp32 values of its nibbles (low nibble first)
_b = torch.arange(256)
_PAIR_VALUES = torch.stack([E2M1_VALUES[_b & 15], E2M1_VALUES[_b >> 4]], dim=1).contiguous()  # [256, 2]
# two packed bytes read as one little-endian uint16 -> their four fp32 values, stored as one 16-byte
# complex128 so that a single table lookup (numpy's take, 1 MiB table) writes four elements; ~4x faster
# on CPU than a lookup per byte
_q = torch.arange(65536)
_QUAD_NP = torch.stack([E2M1_VALUES[(_q >> k) & 15] for k in (0, 4, 8, 12)], dim=1).contiguous().numpy() \
    .view(np.complex128).reshape(65536)
del _b, _q
_LITTLE_ENDIAN = sys.byteorder == "little"


# ---- element codes ----------------------------------------------------------------------------------------

def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Already-scaled values -> E2M1 codes (uint8 0..15), nearest value, ties to even, saturating at 6."""
    v = v.float()
    if torch.isnan(v).any():
        raise ValueError("cannot encode NaN as E2M1")
    mag = torch.bucketize(v.abs().contiguous(), _E2M1_BOUNDS.to(v.device), out_int32=True).to(torch.uint8)
    return mag | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, values 0..15) -> float32."""
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., 2n] -> uint8 [..., n]: element 2k in the low nibble, 2k+1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of 4-bit codes per row")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> codes uint8 [..., 2n] (inverse of pack_nibbles)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


# ---- tensors ----------------------------------------------------------------------------------------------

def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """amax(|w|) / (6 * 448) as a float32 scalar; 1.0 for an all-zero tensor."""
    if w.numel() == 0:
        return torch.ones((), dtype=torch.float32)
    amax = torch.maximum(w.max().float(), -w.min().float())
    return amax / (E2M1_MAX * 448.0) if amax > 0 else torch.ones((), dtype=torch.float32)


def _check_in_features(in_features: int) -> None:
    if in_features % BLOCK:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {BLOCK} (ModelOpt's block size), "
                         f"got {in_features}; keep this layer unquantised or use FP8")


SEARCH_STEPS = 4  # E4M3 values below the amax scale tried by the scale search (plus one above)


def _searched_scales(wc: torch.Tensor, s8: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """Per block [n, nb], the E4M3 scale near s8 that minimises the block's squared error."""
    bits = s8.view(torch.uint8).to(torch.int16)  # positive E4M3: the bit pattern grows with the value
    best, best_err = s8, None
    for step in range(-SEARCH_STEPS, 2):
        cand = (bits + step).clamp(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn)  # 0x7E is 448
        cand = torch.where(bits == 0, s8, cand)  # all-zero (or too small) blocks stay at 0
        d = (cand.float() * gs).unsqueeze(-1)  # [n, nb, 1]
        safe = torch.where(d == 0, torch.ones_like(d), d)
        err = ((e2m1_decode(e2m1_encode(wc / safe)) * d - wc) ** 2).sum(-1)  # [n, nb]
        if best_err is None:
            best, best_err = cand, err
        else:
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
    return best


def quantize_nvfp4(w: torch.Tensor, global_scale: float | torch.Tensor | None = None, scale_search: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> (packed uint8 [out, in/2], scales float8_e4m3fn [out, in/16], global f32 scalar).

    global_scale defaults to amax(|W|) / (6 * 448). scale_search: per-block least-squares choice among
    nearby E4M3 scales (see the module doc) instead of ModelOpt's amax rule. Works on bounded row chunks,
    so the temporary memory stays small whatever the size of W.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_nvfp4 expects a 2-D weight [out, in], got shape {list(w.shape)}")
    w = w.detach()
    out_f, in_f = w.shape
    _check_in_features(in_f)
    _check_finite(w, "quantize_nvfp4")
    gs = nvfp4_global_scale(w) if global_scale is None else torch.as_tensor(global_scale, dtype=torch.float32)
    gs = gs.reshape(()).to(torch.float32).cpu()
    if not (torch.isfinite(gs) and gs > 0):
        raise ValueError(f"quantize_nvfp4: the global scale must be finite and > 0, got {float(gs)}")
    nb = in_f // BLOCK
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, nb, dtype=torch.float8_e4m3fn, device=w.device)
    gsd = gs.to(w.device)
    rows = tile_rows(in_f)
    for r in range(0, out_f, rows):
        wc = w[r: r + rows].float().contiguous().reshape(-1, nb, BLOCK)  # [n, nb, 16]
        block_amax = wc.abs().amax(dim=-1)  # [n, nb]
        s8 = to_e4m3(block_amax / (E2M1_MAX * gsd))
        if scale_search:
            s8 = _searched_scales(wc, s8, gsd)
        d = s8.float() * gsd  # dequantisation factor of each block
        zero = d == 0
        v = wc / torch.where(zero, torch.ones_like(d), d).unsqueeze(-1)
        v.masked_fill_(zero.unsqueeze(-1), 0.0)
        packed[r: r + rows] = pack_nibbles(e2m1_encode(v).reshape(-1, in_f))
        scales[r: r + rows] = s8
    return packed, scales, gs


def _check_packed(packed: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"NVFP4 weight must be uint8 [out, in/2], got {packed.dtype} {list(packed.shape)}")
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    _check_in_features(in_f)
    if scales.dtype != torch.float8_e4m3fn or tuple(scales.shape) != (out_f, in_f // BLOCK):
        raise ValueError(f"NVFP4 scales must be float8_e4m3fn [{out_f}, {in_f // BLOCK}], "
                         f"got {scales.dtype} {list(scales.shape)}")
    return out_f, in_f


def dequantize_tile(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """E2M1(code) * float(scale) as fp32 [rows, in] (exact; the global scale is NOT applied)."""
    rows = packed.shape[0]
    if packed.device.type == "cpu" and _LITTLE_ENDIAN:
        vals = np.take(_QUAD_NP, packed.contiguous().numpy().view(np.uint16)).view(np.float32).reshape(rows, -1, BLOCK)
        vals *= np.take(_E4M3_VALUES_NP, scales.view(torch.uint8).contiguous().numpy())[:, :, None]
        return torch.from_numpy(vals.reshape(rows, -1))
    vals = _PAIR_VALUES.to(packed.device)[packed.long()].reshape(rows, -1, BLOCK)
    return (vals * e4m3_decode(scales).unsqueeze(-1)).reshape(rows, -1)


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: float | torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [out, in/2], scales [out, in/16], global scalar -> W [out, in] in dtype."""
    out_f, in_f = _check_packed(packed, scales)
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device).reshape(())
    out = torch.empty(out_f, in_f, dtype=dtype, device=packed.device)
    rows = tile_rows(in_f)
    for r in range(0, out_f, rows):
        out[r: r + rows] = dequantize_tile(packed[r: r + rows], scales[r: r + rows]).mul_(gs)
    return out


def triton_available() -> bool:
    return _backend.triton_available("triton_nvfp4")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    return _backend.use_triton(backend, x, "triton_nvfp4")


def nvfp4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, global_scale: float | torch.Tensor,
                 bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x [..., in] @ dequantize_nvfp4(...).T + bias -> [..., out] in x's dtype, computed in fp32.

    Row tiles of the packed weight (about 2 MiB of fp32 each) are dequantised one at a time and
    multiplied; the global scale is applied to the output. The full fp32 weight never exists.
    backend: "auto" (Triton on CUDA when importable, else torch), "torch" or "triton" (the packed weight
    is decoded in registers, see hylm.ops.triton_nvfp4; same products, summed in another order).
    """
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    if x.shape[-1] != in_f:
        raise ValueError(f"nvfp4_linear: input has {x.shape[-1]} features, the weight expects {in_f}")
    lead = x.shape[:-1]
    if _use_triton(backend, x):
        from .triton_nvfp4 import nvfp4_linear_triton
        _check_packed(packed, scales)
        y = nvfp4_linear_triton(x.reshape(-1, in_f), packed, scales, global_scale, bias)  # [N, out]
        return y.reshape(*lead, out_f)
    xt = x.reshape(-1, in_f).float().t()  # [in, N]
    yt = torch.empty(out_f, xt.shape[1], dtype=torch.float32, device=x.device)  # y transposed
    rows = tile_rows(in_f)
    for r in range(0, out_f, rows):
        torch.mm(dequantize_tile(packed[r: r + rows], scales[r: r + rows]), xt, out=yt[r: r + rows])
    y = _untranspose(yt).mul_(torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(()))
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_f).to(x.dtype)


# ---- routed experts ---------------------------------------------------------------------------------------

ExpertLinear = Callable[[int, torch.Tensor], torch.Tensor]  # (expert, x [n, in]) -> fp32 [n, out]


def routed_expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                      up: ExpertLinear, down: ExpertLinear, out_features: int) -> torch.Tensor:
    """sum_k weights[:, k] * down(e_k, relu(up(e_k, x))^2), tokens grouped per expert (as
    hylm.ops.moe.grouped_expert_mlp) but with each expert's projections given as functions, so that
    packed experts are dequantised one at a time. Computes in fp32; returns fp32 [N, out]."""
    n, k = ids.shape
    x = x.float()
    if n == 1:
        out = torch.zeros(1, out_features, dtype=torch.float32, device=x.device)
        for j, expert in enumerate(ids[0].tolist()):
            out.add_(down(expert, torch.relu(up(expert, x)).square()) * weights[:, j: j + 1].float())
        return out
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // k
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    x_sorted = x[token_of]
    w_sorted = weights.reshape(-1)[order].unsqueeze(-1).float()
    out_sorted = torch.empty(n * k, out_features, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = torch.relu(up(expert, x_sorted[start:end])).square()
        out_sorted[start:end] = down(expert, h) * w_sorted[start:end]
        start = end
    out = torch.zeros(n, out_features, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, out_sorted)
    return out


def nvfp4_grouped_expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                             up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                             down: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """grouped_expert_mlp with NVFP4 experts. up = (packed [E, I, D/2], scales [E, I, D/16], global [E]),
    down = (packed [E, D_out, I/2], scales [E, D_out, I/16], global [E]). Returns [N, D_out] in x's dtype."""
    up_p, up_s, up_g = up
    dn_p, dn_s, dn_g = down

    def up_fn(e: int, h: torch.Tensor) -> torch.Tensor:
        return nvfp4_linear(h, up_p[e], up_s[e], up_g[e])

    def down_fn(e: int, h: torch.Tensor) -> torch.Tensor:
        return nvfp4_linear(h, dn_p[e], dn_s[e], dn_g[e])

    return routed_expert_mlp(x, weights, ids, up_p.shape[0], up_fn, down_fn, dn_p.shape[1]).to(x.dtype)
