"""GGML block quantisation of weights for GGUF export: F32, F16, BF16, Q8_0, Q4_0 through the `gguf` package's
own encoders, and the k-quants Q4_K, Q5_K, Q6_K (which `gguf.quants` can decode but not encode) here.

The k-quant byte layouts are the ones `gguf.quants` decodes (and llama.cpp reads); the tests check that
`gguf.quants.dequantize` of what is written here gives back exactly the values the encoder chose.
Per super-block of 256 values:
  Q4_K (144 B): d f16 | dmin f16 | 12 B of 6-bit sub-block scales and mins | 128 B of 4-bit values.
                8 sub-blocks of 32: x = d * sc[j] * q - dmin * m[j], q in 0..15.
  Q5_K (176 B): d | dmin | 12 B scales and mins | 32 B high bits | 128 B low nibbles; q in 0..31.
  Q6_K (210 B): 128 B low nibbles | 64 B 2-bit highs | 16 int8 sub-block scales | d f16.
                16 sub-blocks of 16: x = d * sc[j] * (q - 32), q in 0..63.
Sub-block scales and mins are fitted by least squares over a few candidate grids (in the spirit of
llama.cpp's reference quantiser, not bit-identical to it), then the super-block scales are rounded to fp16
and the sub-block values re-rounded against the final scales.

Rows whose length is not a multiple of the block size cannot be stored in a block format: `plan_type`
picks the fallback llama.cpp's converter uses for Q8_0 / Q4_0 (F16), and Q8_0 for the k-quants.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES
from gguf import quants as gguf_quants

QK_K = 256

# `--type` names -> GGML types
EXPORT_TYPES: dict[str, QT] = {
    "f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0,
    "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
}
_FALLBACK = {QT.Q8_0: QT.F16, QT.Q4_0: QT.F16, QT.Q4_K: QT.Q8_0, QT.Q5_K: QT.Q8_0, QT.Q6_K: QT.Q8_0}
# rows processed at once by the k-quant encoders (bounds their temporary memory)
_CHUNK_BLOCKS = 4096


def block_size(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def plan_type(qtype: QT, row_length: int) -> QT:
    """The type a tensor with rows of row_length elements is stored in when qtype is asked for."""
    while row_length % block_size(qtype):
        qtype = _FALLBACK[qtype]
    return qtype


def quantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """float array [..., n] (n a multiple of the block size) -> what GGUFWriter.add_tensor takes: float32 /
    float16 arrays for F32 / F16, the raw bytes uint8 [..., n / block * block_bytes] for the others."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0):
        return gguf_quants.quantize(data, qtype)
    encoder = {QT.Q4_K: _encode_q4_k, QT.Q5_K: _encode_q5_k, QT.Q6_K: _encode_q6_k}.get(qtype)
    if encoder is None:
        raise NotImplementedError(f"quantisation to {qtype.name} is not supported")
    if data.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {QK_K} elements, got {data.shape[-1]}")
    blocks = data.reshape(-1, QK_K)
    type_size = GGML_QUANT_SIZES[qtype][1]
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    for lo in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[lo: lo + _CHUNK_BLOCKS] = encoder(blocks[lo: lo + _CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * type_size)


def dequantize(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """The inverse, through the `gguf` package's decoders: float32 [..., n]."""
    return np.asarray(gguf_quants.dequantize(raw, qtype), dtype=np.float32)


# ---- k-quant encoders ---------------------------------------------------------------------------------

def _fp16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _fit_scale_min(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-blocks x [n, k] -> (scale >= 0, offset <= 0) [n] with x ~= scale * q + offset, q in 0..nmax.

    Candidate grids start from the sub-block's range; for each, the rounded q are refitted by least
    squares (offset clamped to <= 0, as the format stores -offset); the candidate with the least squared
    error wins."""
    k = x.shape[1]
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = hi - lo
    safe_span = np.where(span > 0, span, 1.0)
    best_scale = np.where(span > 0, span / nmax, 0.0)
    best_off = lo.copy()
    q0 = np.clip(np.rint((x - lo[:, None]) / np.where(best_scale > 0, best_scale, 1.0)[:, None]), 0, nmax)
    best_err = ((best_scale[:, None] * q0 + best_off[:, None] - x) ** 2).sum(axis=1)
    for delta in np.arange(-1.0, 1.01, 0.1):
        iscale = (nmax + delta) / safe_span
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, nmax)
        sq, sqq = q.sum(axis=1), (q * q).sum(axis=1)
        sx, sqx = x.sum(axis=1), (q * x).sum(axis=1)
        det = k * sqq - sq * sq
        ok = det > 0
        det = np.where(ok, det, 1.0)
        scale = (k * sqx - sq * sx) / det
        off = (sqq * sx - sq * sqx) / det
        positive = off > 0  # the format only holds offsets <= 0: refit the scale with offset 0
        scale = np.where(positive, sqx / np.where(sqq > 0, sqq, 1.0), scale)
        off = np.where(positive, 0.0, off)
        scale = np.maximum(scale, 0.0)
        err = ((scale[:, None] * q + off[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best_err) & (span > 0)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_off = np.where(better, off, best_off)
    return best_scale, best_off


def _super_block_q(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocks x [n, 256] -> (d [n], dmin [n] fp16-exact, sub-scales [n, 8], sub-mins [n, 8] in 0..63,
    q [n, 256] in 0..nmax) for the Q4_K / Q5_K layout."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, off = _fit_scale_min(sub, nmax)
    scale, neg_off = scale.reshape(n, 8), (-off).reshape(n, 8)
    d = _fp16_round(scale.max(axis=1) / 63)
    dmin = _fp16_round(neg_off.max(axis=1) / 63)
    ls = np.clip(np.rint(scale / np.where(d > 0, d, 1.0)[:, None]), 0, 63)
    lm = np.clip(np.rint(neg_off / np.where(dmin > 0, dmin, 1.0)[:, None]), 0, 63)
    eff_scale = (d[:, None] * ls)[:, :, None]  # [n, 8, 1]
    eff_off = (dmin[:, None] * lm)[:, :, None]
    q = np.rint((x.reshape(n, 8, 32) + eff_off) / np.where(eff_scale > 0, eff_scale, 1.0))
    q = np.where(eff_scale > 0, np.clip(q, 0, nmax), 0)
    return d, dmin, ls.astype(np.uint8), lm.astype(np.uint8), q.reshape(n, QK_K).astype(np.uint8)


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit sub-block scales and mins [n, 8] -> the 12-byte k-quant packing [n, 12]: bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins; bytes
    8-11 the low nibbles of scales 4-7 (low half) and mins 4-7 (high half)."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _pack_nibble_pairs(q: np.ndarray) -> np.ndarray:
    """Values [n, 256] (low nibbles used) -> 128 bytes: byte 32 c + i holds sub-block 2c's value i in its low
    nibble and sub-block 2c+1's value i in its high nibble."""
    q = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _encode_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _super_block_q(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(ls, lm), _pack_nibble_pairs(q)],
                          axis=1)


def _encode_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, q = _super_block_q(x, 31)
    bits = ((q >> 4) & 1).reshape(-1, 8, 32)  # fifth bit of sub-block j's value i -> bit j of byte i
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= bits[:, j, :] << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_mins(ls, lm), qh, _pack_nibble_pairs(q)],
                          axis=1)


def _encode_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    # scale = -(signed value of largest magnitude) / 32, so that value lands exactly on q - 32 = -32;
    # then try nearby grids and refit by least squares (no offset in this format)
    pick = np.take_along_axis(sub, np.abs(sub).argmax(axis=1)[:, None], axis=1)[:, 0]
    safe_pick = np.where(pick != 0, pick, 1.0)
    best_scale = -pick / 32
    best_err = np.full(sub.shape[0], np.inf)
    for delta in np.arange(-0.9, 0.91, 0.1):
        iscale = -(32 + delta) / safe_pick
        q = np.clip(np.rint(sub * iscale[:, None]), -32, 31)
        sqq = (q * q).sum(axis=1)
        scale = np.where(sqq > 0, (q * sub).sum(axis=1) / np.where(sqq > 0, sqq, 1.0), 0.0)
        err = ((scale[:, None] * q - sub) ** 2).sum(axis=1)
        better = (err < best_err) & (pick != 0)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    scale = best_scale.reshape(n, 16)
    pick_scale = np.take_along_axis(scale, np.abs(scale).argmax(axis=1)[:, None], axis=1)[:, 0]
    d = _fp16_round(-pick_scale / 128)
    sc = np.clip(np.rint(scale / np.where(d != 0, d, 1.0)[:, None]), -128, 127)
    eff = (d[:, None] * sc)[:, :, None]  # [n, 16, 1]
    q = np.rint(x.reshape(n, 16, 16) / np.where(eff != 0, eff, 1.0))
    q = (np.where(eff != 0, np.clip(q, -32, 31), 0) + 32).astype(np.uint8).reshape(n, 8, 32)
    # 32-value group g = 4 h + r: low nibble in ql byte 64 h + 32 (r % 2) + i, nibble r // 2;
    # top two bits in qh byte 32 h + i, bits 2r..2r+1
    ql = np.empty((n, 2, 2, 32), dtype=np.uint8)
    qh = np.zeros((n, 2, 32), dtype=np.uint8)
    for h in range(2):
        for t in range(2):
            ql[:, h, t] = (q[:, 4 * h + t] & 0x0F) | ((q[:, 4 * h + 2 + t] & 0x0F) << 4)
        for r in range(4):
            qh[:, h] |= ((q[:, 4 * h + r] >> 4) & 0x03) << (2 * r)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


__all__ = ["EXPORT_TYPES", "QK_K", "plan_type", "quantize", "dequantize", "block_size"]
