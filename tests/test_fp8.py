"""FP8 E4M3: bit-exact encode / decode against hand-computed bit patterns, per-tensor quantisation and
fp8_linear computing from the FP8 tensor."""

import math

import pytest
import torch

from hylm.ops.fp8 import (E4M3_VALUES, dequantize_fp8, e4m3_decode, e4m3_encode, fp8_linear, quantize_fp8,
                          tile_rows)

# value -> E4M3 byte, computed by hand: sign | exponent (4 bits, bias 7) | mantissa (3 bits)
E4M3_TABLE = [
    (0.0, 0x00), (-0.0, 0x80),
    (1.0, 0x38),                 # 0 0111 000
    (-2.0, 0xC0),                # 1 1000 000
    (0.5, 0x30),                 # 0 0110 000
    (3.0, 0x44),                 # 1.5 * 2^1: 0 1000 100
    (240.0, 0x77),               # 1.875 * 2^7: 0 1110 111
    (448.0, 0x7E),               # 1.75 * 2^8, the largest finite value: 0 1111 110
    (-448.0, 0xFE),
    (2.0 ** -6, 0x08),           # smallest normal: 0 0001 000
    (7 * 2.0 ** -9, 0x07),       # largest subnormal 7/8 * 2^-6
    (2.0 ** -9, 0x01),           # smallest subnormal
    (0.1, 0x1D),                 # 1.6 * 2^-4 -> mantissa 4.8 -> 5: 1.625 * 2^-4 = 0.1015625
    # ties go to the even mantissa
    (1.0625, 0x38),              # halfway 1.0 (m=0) / 1.125 (m=1) -> 1.0
    (1.1875, 0x3A),              # halfway 1.125 (m=1) / 1.25 (m=2) -> 1.25
    (2.0 ** -10, 0x00),          # halfway 0 / 2^-9 -> 0
    (3 * 2.0 ** -10, 0x02),      # halfway 2^-9 (m=1) / 2^-8 (m=2) -> 2^-8
    (1.5 * 2.0 ** -10, 0x01),    # not a tie: nearer 2^-9
    (2.0 ** -12, 0x00),          # underflow
    (-2.0 ** -12, 0x80),         # underflow keeps the sign
    # saturation: never NaN
    (464.0, 0x7E), (1e6, 0x7E), (-1e6, 0xFE), (math.inf, 0x7E), (-math.inf, 0xFE),
]


def _reference_decode(byte: int) -> float:
    s, e, m = byte >> 7, (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return math.nan
    mag = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if s else mag


def test_e4m3_encode_hand_table():
    values = torch.tensor([v for v, _ in E4M3_TABLE], dtype=torch.float32)
    got = e4m3_encode(values).tolist()
    assert got == [b for _, b in E4M3_TABLE], [(v, hex(g), hex(b)) for (v, b), g in zip(E4M3_TABLE, got) if g != b]


def test_e4m3_decode_all_256_codes():
    bits = torch.arange(256, dtype=torch.uint8)
    got = e4m3_decode(bits)
    for b in range(256):
        want = _reference_decode(b)
        if math.isnan(want):
            assert math.isnan(got[b].item())
        else:
            assert got[b].item() == want and math.copysign(1, got[b].item()) == math.copysign(1, want), hex(b)
    # decode(encode(x)) == x for every finite code
    finite = ~torch.isnan(E4M3_VALUES)
    assert torch.equal(e4m3_encode(E4M3_VALUES[finite]), bits[finite])


def test_e4m3_encode_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        e4m3_encode(torch.tensor([1.0, math.nan]))


def test_quantize_fp8_scale_and_values():
    w = torch.tensor([[0.5, -3.0, 896.0, 1.0]])
    w8, scale = quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == ()
    assert scale.item() == 2.0  # amax 896 / 448
    assert w8.view(torch.uint8).tolist() == [[0x28, 0xBC, 0x7E, 0x30]]  # 0.25 (0 0101 000), -1.5 (1 0111 100), 448, 0.5
    assert dequantize_fp8(w8, scale).tolist() == [[0.5, -3.0, 896.0, 1.0]]


def test_quantize_fp8_round_trip_and_zero_tensor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 48, generator=g) * 0.02
    w8, scale = quantize_fp8(w)
    deq = dequantize_fp8(w8, scale)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormal range
    normal = w.abs() >= 2.0 ** -6 * scale
    assert ((deq - w).abs()[normal] <= w.abs()[normal] * 2.0 ** -4 + 1e-12).all()
    assert ((deq - w).abs()[~normal] <= 2.0 ** -10 * scale).all()
    w8b, scale_b = quantize_fp8(deq, scale)
    assert torch.equal(w8b.view(torch.uint8), w8.view(torch.uint8))  # idempotent
    z8, zs = quantize_fp8(torch.zeros(3, 16))
    assert zs.item() == 1.0 and not z8.view(torch.uint8).any()
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_fp8(torch.tensor([[1.0, math.inf]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_dequantised_matmul(dtype):
    g = torch.Generator().manual_seed(1)
    in_f = 96
    out_f = tile_rows(in_f) + 37  # crosses a tile boundary
    w8, scale = quantize_fp8(torch.randn(out_f, in_f, generator=g))
    bias = torch.randn(out_f, generator=g)
    ref_w = dequantize_fp8(w8, scale)
    for shape in [(1, in_f), (5, in_f), (2, 3, in_f)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        y = fp8_linear(x, w8, scale, bias)
        assert y.dtype == dtype and y.shape == (*shape[:-1], out_f)
        ref = x.float() @ ref_w.t() + bias
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-4 if dtype == torch.float32 else 1e-1)
