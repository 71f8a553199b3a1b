"""FP8 E4M3 (`float8_e4m3fn`): the element format of FP8 checkpoints and of NVFP4's block scales.

E4M3 ("fn": finite, no infinities): bit 7 sign, bits 6-3 exponent (bias 7), bits 2-0 mantissa. Normal
values (exponent 1..15) are 2^(e-7) * (1 + m/8), subnormals (exponent 0) m/8 * 2^-6, so the smallest
positive value is 2^-9 (0x01) and the largest 448 (0x7E = 2^8 * 1.75); 0x7F / 0xFF are NaN.

Encoding (`e4m3_encode`, and everything that quantizes to E4M3 here) rounds to the nearest value,
ties to the even code (the one whose mantissa's last bit is 0), and SATURATES: magnitudes above 448
(infinities included) become +-448, never NaN; the sign of zero is kept (-0.0 -> 0x80). NaN inputs are
refused by the quantizers (a weight must be finite).

Per-tensor FP8 linear layers: `quantize_fp8(w)` -> (w8 float8_e4m3fn, scale f32 scalar = amax/448), with
w ~= float(w8) * scale; `fp8_linear` computes x @ dequant(w8).T from the FP8 tensor, dequantising a
bounded tile of rows at a time (never the whole fp32 weight).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn

# float32 value of every E4M3 byte (0x7F and 0xFF are NaN)
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
_E4M3_VALUES_NP = E4M3_VALUES.numpy()
# two E4M3 bytes read as one little-endian uint16 -> their two fp32 values as one int64 (512 KiB table)
_q = torch.arange(65536)
_E4M3_PAIRS_NP = torch.stack([E4M3_VALUES[_q & 255], E4M3_VALUES[_q >> 8]], dim=1).contiguous().numpy() \
    .view(np.int64).reshape(65536)
del _q
_LITTLE_ENDIAN = sys.byteorder == "little"

# rows x in_features of one dequantised fp32 tile: 2 MiB, which stays in cache while it is multiplied
TILE_ELEMENTS = 1 << 19


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float tensor -> E4M3 bytes (uint8), round to nearest even, saturating at +-448."""
    x = x.float()
    if torch.isnan(x).any():
        raise ValueError("cannot encode NaN as E4M3")
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).view(torch.uint8)


def e4m3_decode(bits: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes (uint8) or a float8_e4m3fn tensor -> float32."""
    if bits.dtype == FP8_DTYPE:
        bits = bits.view(torch.uint8)
    if bits.dtype != torch.uint8:
        raise TypeError(f"expected uint8 or float8_e4m3fn, got {bits.dtype}")
    return E4M3_VALUES.to(bits.device)[bits.long()]


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float tensor -> float8_e4m3fn with e4m3_encode's rounding and saturation."""
    return e4m3_encode(x).view(FP8_DTYPE)


def decode_fp8_cpu(w8: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn (CPU) -> float32 through a 256-entry table (faster than torch's cast on CPU)."""
    bits = w8.view(torch.uint8)
    if bits.device.type != "cpu":
        return w8.float()
    arr = bits.contiguous().numpy()
    if _LITTLE_ENDIAN and arr.ndim and arr.shape[-1] % 2 == 0:
        return torch.from_numpy(np.take(_E4M3_PAIRS_NP, arr.view(np.uint16)).view(np.float32))
    return torch.from_numpy(np.take(_E4M3_VALUES_NP, arr))


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"{what}: cannot quantize a tensor with NaN or infinite values")


def quantize_fp8(w: torch.Tensor, scale: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8: w -> (w8 float8_e4m3fn [same shape], scale f32 scalar).

    scale = amax(|w|) / 448 unless given (1.0 for an all-zero tensor); w8 = e4m3(w / scale), saturating.
    """
    w = w.detach()
    _check_finite(w, "quantize_fp8")
    if scale is None:
        amax = torch.maximum(w.max().float(), -w.min().float()) if w.numel() else torch.zeros(())
        scale = amax / E4M3_MAX if amax > 0 else torch.ones(())
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(()).cpu()
    if not (torch.isfinite(scale) and scale > 0):
        raise ValueError(f"quantize_fp8: the scale must be finite and > 0, got {float(scale)}")
    out = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)  # row-major, whatever w's layout
    w2 = w.reshape(-1, w.shape[-1]) if w.ndim >= 2 else w.reshape(1, -1)
    out2 = out.view(w2.shape)
    rows, sd = tile_rows(w2.shape[1]), scale.to(w.device)
    for r in range(0, w2.shape[0], rows):  # bounded temporaries
        out2[r: r + rows] = to_e4m3(w2[r: r + rows].float() / sd)
    return out, scale.clone()


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float(w8) * scale, computed in fp32, returned in dtype."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=w8.device).reshape(())
    return (decode_fp8_cpu(w8) * scale).to(dtype)


def _untranspose(yt: torch.Tensor) -> torch.Tensor:
    """[out, N] -> contiguous [N, out] (a free view when N == 1)."""
    return yt.view(1, -1) if yt.shape[1] == 1 else yt.t().contiguous()


def tile_rows(in_features: int) -> int:
    return max(1, TILE_ELEMENTS // max(1, in_features))


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor | float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ (float(w8) * scale).T + bias -> [..., out] in x's dtype.

    Computes in fp32 from the FP8 tensor: row tiles of w8 are decoded to fp32 one at a time and the
    per-tensor scale is applied to the output, so the temporary memory is one tile.
    """
    out_f, in_f = w8.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f).float()
    yt = torch.empty(out_f, x2.shape[0], dtype=torch.float32, device=x.device)  # y transposed [out, N]
    xt = x2.t()
    rows = tile_rows(in_f)
    for r in range(0, out_f, rows):
        tile = decode_fp8_cpu(w8[r: r + rows])
        torch.mm(tile, xt, out=yt[r: r + rows])
    y = _untranspose(yt).mul_(torch.as_tensor(scale, dtype=torch.float32, device=x.device))
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, out_f).to(x.dtype)
