"""NVFP4: bit-exact E2M1 codes, nibble order, block scales and global scale against hand-computed tables;
packed round trips; nvfp4_linear and the NVFP4 routed experts against dense references; packed modules."""

import math
import textwrap

import pytest
import torch

from triton_interpreter import needs_triton, run_under_interpreter

from hylm.model.quantized import FP8Linear, NVFP4Experts, NVFP4Linear, QuantizedExperts
from hylm.ops.moe import grouped_expert_mlp
from hylm.ops.nvfp4 import (SEARCH_STEPS, dequantize_nvfp4, e2m1_decode, e2m1_encode, nvfp4_global_scale,
                            nvfp4_grouped_expert_mlp, nvfp4_linear, pack_nibbles, quantize_nvfp4, unpack_nibbles)
from hylm.ops.fp8 import tile_rows

E2M1_DECODE = {0x0: 0.0, 0x1: 0.5, 0x2: 1.0, 0x3: 1.5, 0x4: 2.0, 0x5: 3.0, 0x6: 4.0, 0x7: 6.0,
               0x8: -0.0, 0x9: -0.5, 0xA: -1.0, 0xB: -1.5, 0xC: -2.0, 0xD: -3.0, 0xE: -4.0, 0xF: -6.0}

# scaled value -> code. Ties (the midpoints) go to the even code (mantissa bit 0).
E2M1_ENCODE = [
    # exact grid values
    (0.0, 0x0), (0.5, 0x1), (1.0, 0x2), (1.5, 0x3), (2.0, 0x4), (3.0, 0x5), (4.0, 0x6), (6.0, 0x7),
    (-0.5, 0x9), (-1.0, 0xA), (-1.5, 0xB), (-2.0, 0xC), (-3.0, 0xD), (-4.0, 0xE), (-6.0, 0xF),
    # ties: round half to even
    (0.25, 0x0), (0.75, 0x2), (1.25, 0x2), (1.75, 0x4), (2.5, 0x4), (3.5, 0x6), (5.0, 0x6),
    (-0.25, 0x8), (-0.75, 0xA), (-1.25, 0xA), (-1.75, 0xC), (-2.5, 0xC), (-3.5, 0xE), (-5.0, 0xE),
    # just off the ties
    (0.2500001, 0x1), (0.7499999, 0x1), (1.2500001, 0x3), (1.7499999, 0x3), (2.5000002, 0x5), (3.4999998, 0x5),
    (5.0000005, 0x7), (4.9999995, 0x6),
    # nearest
    (0.1, 0x0), (0.6, 0x1), (0.9, 0x2), (2.2, 0x4), (2.8, 0x5), (4.4, 0x6), (5.6, 0x7),
    # signed zeros and tiny negatives keep their sign
    (-0.0, 0x8), (-0.1, 0x8), (-1e-30, 0x8),
    # saturation beyond 6
    (6.5, 0x7), (7.0, 0x7), (100.0, 0x7), (-100.0, 0xF), (math.inf, 0x7), (-math.inf, 0xF),
]


def test_e2m1_decode_all_16_codes():
    got = e2m1_decode(torch.arange(16, dtype=torch.uint8)).tolist()
    for code, want in E2M1_DECODE.items():
        assert got[code] == want and math.copysign(1, got[code]) == math.copysign(1, want), hex(code)


def test_e2m1_encode_hand_table():
    values = torch.tensor([v for v, _ in E2M1_ENCODE], dtype=torch.float32)
    got = e2m1_encode(values).tolist()
    bad = [(v, hex(g), hex(c)) for (v, c), g in zip(E2M1_ENCODE, got) if g != c]
    assert not bad, bad
    # every code decodes and re-encodes to itself
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1_encode(e2m1_decode(codes)), codes)


def test_nibble_order_low_nibble_first():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x7, 0x8]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_quantize_hand_computed_block():
    # global scale 1 and block amax 6 -> block scale e4m3(6 / 6) = 1.0 (0x38): codes are the values' own
    row = [6.0, 0.5, -1.0, 0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, -0.0, 3.0, -6.0]
    packed, scales, gs = quantize_nvfp4(torch.tensor([row]), global_scale=1.0)
    codes = [0x7, 0x1, 0xA, 0x0, 0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0x8, 0xE, 0x8, 0x5, 0xF]
    assert packed.tolist() == [[codes[2 * k] | (codes[2 * k + 1] << 4) for k in range(8)]]
    assert packed.tolist() == [[0x17, 0x0A, 0x20, 0x42, 0x64, 0x86, 0x8E, 0xF5]]
    assert scales.view(torch.uint8).tolist() == [[0x38]] and gs.item() == 1.0


def test_block_scales_hand_computed():
    gs = 1.0
    blocks = [
        ([3.0] + [0.0] * 15, 0x30, 0x7),        # amax 3 -> scale e4m3(0.5) = 0x30; 3 / 0.5 = 6
        ([1.5] + [0.0] * 15, 0x28, 0x7),        # scale 0.25 (0 0101 000)
        ([6 * 2.0 ** -9] + [0.0] * 15, 0x01, 0x7),   # subnormal scale 2^-9
        ([6 * 2.0 ** -11] + [0.0] * 15, 0x00, 0x0),  # scale below E4M3's range -> 0, block encodes 0
        ([5376.0] + [0.0] * 15, 0x7E, 0x7),     # amax / 6 = 896 saturates at 448; 5376 / 448 = 12 -> 6
        ([0.0] * 16, 0x00, 0x0),                # all-zero block
        # amax 2 -> e4m3(1/3): 1.333 * 2^-2, mantissa 2.67 -> 3: 1.375 * 2^-2 = 0.34375 (0 0101 011);
        # -2 / 0.34375 = -5.82 -> -6
        ([-2.0, 1.0] + [0.0] * 14, 0x2B, 0xF),
    ]
    w = torch.tensor([b for b, _, _ in blocks], dtype=torch.float32)
    packed, scales, _ = quantize_nvfp4(w, global_scale=gs)
    assert scales.view(torch.uint8)[:, 0].tolist() == [s for _, s, _ in blocks]
    assert (packed[:, 0] & 15).tolist() == [c for _, _, c in blocks]
    # 1 / 0.34375 = 2.91 -> 3 (code 5), in the high nibble of the last row's first byte
    assert packed[-1, 0].item() >> 4 == 0x5
    deq = dequantize_nvfp4(packed, scales, gs)
    assert deq[3].abs().sum() == 0 and deq[5].abs().sum() == 0
    assert deq[4, 0].item() == 6 * 448.0


def test_scale_search_hand_computed_block():
    """[7, 2.5 x 15], global 1: the amax rule takes e4m3(7/6 = 1.167) = 1.125 (0x39) and dequantises to
    6.75 and 2.25 (squared error 0.0625 x 16 = 1.0); one E4M3 step up, 1.25 (0x3A), gives 7.5 and exactly
    2.5 (error 0.25), so the search takes it. Codes are 6 and 2 either way."""
    row = torch.tensor([[7.0] + [2.5] * 15])
    for search, scale, values in ((False, 0x39, [6.75, 2.25]), (True, 0x3A, [7.5, 2.5])):
        packed, scales, _ = quantize_nvfp4(row, global_scale=1.0, scale_search=search)
        assert scales.view(torch.uint8).tolist() == [[scale]]
        assert packed.tolist() == [[0x47] + [0x44] * 7]
        assert dequantize_nvfp4(packed, scales, 1.0).tolist() == [[values[0]] + [values[1]] * 15]


def test_scale_search_never_increases_a_block_error():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g) ** 3  # heavy tails: the amax rule's weak spot
    w[3, 16:32] = 0.0  # an all-zero block stays at scale 0
    plain = quantize_nvfp4(w)
    searched = quantize_nvfp4(w, scale_search=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, quantize_nvfp4(w, scale_search=False)))
    assert torch.equal(plain[2], searched[2])  # same global scale
    err = [((dequantize_nvfp4(*q) - w) ** 2).reshape(64, 16, 16).sum(-1) for q in (plain, searched)]
    assert (err[1] <= err[0]).all() and err[1].sum() < 0.95 * err[0].sum()
    assert searched[1].view(torch.uint8)[3, 1] == 0 and (dequantize_nvfp4(*searched)[3, 16:32] == 0).all()
    # every chosen scale is the amax one or within SEARCH_STEPS below / one above it
    step = searched[1].view(torch.uint8).int() - plain[1].view(torch.uint8).int()
    assert step.min() >= -SEARCH_STEPS and step.max() <= 1 and (step != 0).any()


def test_global_scale_and_zero_tensor():
    w = torch.tensor([[1.0, -5376.0] + [0.0] * 14])
    assert nvfp4_global_scale(w).item() == torch.tensor(5376.0 / 2688.0).item()
    packed, scales, gs = quantize_nvfp4(torch.zeros(2, 32))
    assert gs.item() == 1.0 and not packed.any() and not scales.view(torch.uint8).any()
    assert not dequantize_nvfp4(packed, scales, gs).any()


def _reference_dequant(packed, scales, gs):
    """Hand formula: E2M1(code) * float(scale), then * global, element by element."""
    codes = unpack_nibbles(packed)
    vals = torch.tensor([E2M1_DECODE[c] for c in range(16)])[codes.long()]
    s = scales.float().repeat_interleave(16, dim=1)
    return vals * s * torch.as_tensor(gs, dtype=torch.float32)


def test_round_trip_error_and_idempotence():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 96, generator=g) * torch.rand(70, 1, generator=g)  # rows of different magnitudes
    w[3, 16:32] = 0.0  # an all-zero block
    packed, scales, gs = quantize_nvfp4(w)
    assert packed.shape == (70, 48) and scales.shape == (70, 6) and gs.shape == ()
    assert gs.item() == (w.abs().max() / 2688.0).item()
    deq = dequantize_nvfp4(packed, scales, gs)
    assert torch.equal(deq, _reference_dequant(packed, scales, gs))  # bit-exact
    assert not deq[3, 16:32].any()
    # error within half the E2M1 grid step at each value, in units of the block's scale
    d = (scales.float() * gs).repeat_interleave(16, dim=1)
    v = (w / torch.where(d > 0, d, torch.ones_like(d))).abs()
    half_step = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
    assert ((deq - w).abs() <= half_step * d * (1 + 1e-6)).all()
    # quantise(dequantise(q)) == q, bit for bit, with the same global scale
    p2, s2, gs2 = quantize_nvfp4(deq, gs)
    assert torch.equal(p2, packed) and torch.equal(s2.view(torch.uint8), scales.view(torch.uint8))
    assert torch.equal(dequantize_nvfp4(p2, s2, gs2), deq)


def test_input_width_must_be_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.randn(4, 24))
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nvfp4(torch.tensor([[math.nan] * 16]))
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear(24, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_linear_matches_dequantised_matmul(dtype):
    g = torch.Generator().manual_seed(1)
    in_f = 2048
    out_f = tile_rows(in_f) + 70  # a full tile and a partial one
    packed, scales, gs = quantize_nvfp4(torch.randn(out_f, in_f, generator=g) * 0.05)
    bias = torch.randn(out_f, generator=g)
    ref_w = dequantize_nvfp4(packed, scales, gs)
    for shape in [(1, in_f), (7, in_f), (2, 3, in_f)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        y = nvfp4_linear(x, packed, scales, gs, bias)
        assert y.dtype == dtype and y.shape == (*shape[:-1], out_f) and y.is_contiguous()
        ref = (x.float() @ ref_w.t() + bias).to(dtype)
        torch.testing.assert_close(y, ref, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-4 if dtype == torch.float32 else 5e-2)


def test_nvfp4_experts_match_dense_grouped_mlp():
    g = torch.Generator().manual_seed(2)
    e, d, i = 6, 32, 48
    up, down = torch.randn(e, i, d, generator=g) * 0.2, torch.randn(e, d, i, generator=g) * 0.2
    q = [quantize_nvfp4(up[k]) for k in range(e)]
    r = [quantize_nvfp4(down[k]) for k in range(e)]
    upq = tuple(torch.stack([t[j] for t in q]) for j in range(3))
    dnq = tuple(torch.stack([t[j] for t in r]) for j in range(3))
    up_ref = torch.stack([dequantize_nvfp4(*t) for t in q])
    dn_ref = torch.stack([dequantize_nvfp4(*t) for t in r])
    for n in (1, 9):
        x = torch.randn(n, d, generator=g)
        ids = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(n)])
        weights = torch.rand(n, 2, generator=g)
        got = nvfp4_grouped_expert_mlp(x, weights, ids, upq, dnq)
        torch.testing.assert_close(got, grouped_expert_mlp(x, weights, ids, up_ref, dn_ref), rtol=1e-5, atol=1e-5)
        # the module computes the same
        m = NVFP4Experts(e, d, i)
        m.up_proj, m.up_proj_weight_scale, m.up_proj_weight_scale_2 = upq
        m.down_proj, m.down_proj_weight_scale, m.down_proj_weight_scale_2 = dnq
        torch.testing.assert_close(m(x, weights, ids), got)


def test_packed_modules_from_dense():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 40, bias=True)
    torch.nn.init.normal_(lin.weight, std=0.1, generator=g)
    x = torch.randn(5, 64, generator=g)
    for cls in (NVFP4Linear, FP8Linear):
        q = cls.from_linear(lin, input_amax=3.0)
        torch.testing.assert_close(q(x), x @ q.dequantize().t() + lin.bias, rtol=1e-5, atol=1e-5)
        assert q.input_scale.item() == pytest.approx(3.0 / (2688.0 if cls is NVFP4Linear else 448.0))
        assert set(q.state_dict()) >= {"weight", "weight_scale", "input_scale", "bias"}
    nv = NVFP4Linear.from_linear(lin)
    assert nv.weight.dtype == torch.uint8 and nv.weight.shape == (40, 32)
    assert nv.weight_scale.dtype == torch.float8_e4m3fn and nv.weight_scale.shape == (40, 4)
    assert nv.weight_scale_2.shape == () and nv.weight_scale_2.dtype == torch.float32
    # experts with one projection dense and one FP8
    from hylm.model.moe import Experts
    dense = Experts(4, 32, 16)
    torch.nn.init.normal_(dense.up_proj, std=0.1, generator=g)
    torch.nn.init.normal_(dense.down_proj, std=0.1, generator=g)
    qe = QuantizedExperts.from_experts(dense, None, "fp8")
    assert torch.equal(qe.up_proj, dense.up_proj) and qe.down_proj.dtype == torch.float8_e4m3fn
    x = torch.randn(6, 32, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2], [1, 3]])
    w = torch.rand(6, 2, generator=g)
    ref = grouped_expert_mlp(x, w, ids, qe.dequantize("up_proj"), qe.dequantize("down_proj"))
    torch.testing.assert_close(qe(x, w, ids), ref, rtol=1e-5, atol=1e-5)


def test_portable_dequant_path_matches_fast_path(monkeypatch):
    """The torch-only path (other devices, big-endian hosts) gives the same bits as the CPU table path."""
    import hylm.ops.fp8 as fp8_ops
    import hylm.ops.nvfp4 as nvfp4_ops
    from hylm.ops.fp8 import decode_fp8_cpu, quantize_fp8

    g = torch.Generator().manual_seed(4)
    packed, scales, gs = quantize_nvfp4(torch.randn(40, 64, generator=g))
    w8, _ = quantize_fp8(torch.randn(8, 34, generator=g))
    fast, fast8 = dequantize_nvfp4(packed, scales, gs), decode_fp8_cpu(w8)
    monkeypatch.setattr(nvfp4_ops, "_LITTLE_ENDIAN", False)
    monkeypatch.setattr(fp8_ops, "_LITTLE_ENDIAN", False)
    assert torch.equal(dequantize_nvfp4(packed, scales, gs), fast)
    assert torch.equal(decode_fp8_cpu(w8), fast8) and torch.equal(fast8, w8.float())


def test_nvfp4_linear_backend_choice():
    g = torch.Generator().manual_seed(7)
    packed, scales, gs = quantize_nvfp4(torch.randn(8, 32, generator=g))
    x = torch.randn(2, 32, generator=g)
    assert torch.equal(nvfp4_linear(x, packed, scales, gs, backend="torch"), nvfp4_linear(x, packed, scales, gs))
    import hylm.ops.nvfp4 as nvfp4_ops
    assert nvfp4_ops._use_triton("auto", x) is False  # CPU tensors stay on the torch path
    with pytest.raises(ValueError, match="backend"):
        nvfp4_linear(x, packed, scales, gs, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# Triton weight-only GEMM, run by the interpreter on the CPU in a subprocess (TRITON_INTERPRET must be
# set before triton is imported, and must not leak into other tests)
# ---------------------------------------------------------------------------------------------------

NVFP4_TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from hylm.ops.nvfp4 import (dequantize_nvfp4, nvfp4_global_scale, nvfp4_linear, pack_nibbles,
                                quantize_nvfp4, unpack_nibbles)
    from hylm.ops.triton_nvfp4 import nvfp4_linear_triton
    g = torch.Generator().manual_seed(11)
    cases = 0

    def weight(n, k, saturate):
        w = torch.randn(n, k, generator=g) * (0.1 + torch.rand(n, 1, generator=g))
        w[0, 16:32] = 0.0  # an all-zero block: scale 0
        w[1, :16] = -0.001 * torch.rand(16, generator=g)  # tiny negatives next to a big value: code 8 (-0.0)
        w[1, 5] = 3.0
        # a global scale 16x too small saturates most block scales at 448 and their codes at 6
        q = quantize_nvfp4(w, nvfp4_global_scale(w) / 16 if saturate else None)
        codes, sbits = unpack_nibbles(q[0]), q[1].view(torch.uint8)
        assert (codes[1, :16] == 8).sum() == 15 and sbits[0, 1] == 0
        if saturate:  # (without, only the block holding the tensor's amax has scale 448)
            assert (sbits == 0x7E).sum() > n * k // 32
        return q

    def check(name, got, ref, dtype):
        global cases
        assert got.dtype == ref.dtype and got.shape == ref.shape, (name, got.dtype, got.shape)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        scale = ref.float().abs().amax().clamp(min=1.0)  # saturated weights give outputs in the thousands
        torch.testing.assert_close(got.float() / scale, ref.float() / scale, **tol, msg=name)
        cases += 1

    for n in (16, 40):
        for k in (32, 80):
            for saturate in (False, True):
                packed, scales, gs = weight(n, k, saturate)
                w = dequantize_nvfp4(packed, scales, gs)
                for m in (1, 3, 33):
                    for dtype in (torch.float32, torch.bfloat16):
                        x = torch.randn(m, k, generator=g).to(dtype)
                        for bias in (None, torch.randn(n, generator=g)):
                            name = f"m={m} n={n} k={k} sat={saturate} {dtype} bias={bias is not None}"
                            ref = nvfp4_linear(x, packed, scales, gs, bias, backend="torch")
                            dense = x.float() @ w.t() + (0 if bias is None else bias)
                            got = nvfp4_linear(x, packed, scales, gs, bias, backend="triton")
                            check(name, got, ref, dtype)
                            check(name + " dense", got, dense.to(dtype), dtype)
                            # small tiles: several K blocks with a partial last one, partial N tiles
                            small = nvfp4_linear_triton(x, packed, scales, gs, bias, block_m=16, block_n=16,
                                                        block_k=32)
                            check(name + " small tiles", small, ref, dtype)

    # every non-NaN E4M3 scale byte and every E2M1 code, read back through x = I: bit-exact
    codes = (torch.arange(254 * 32).reshape(254, 32) * 7 + torch.arange(254)[:, None]) % 16
    packed = pack_nibbles(codes.to(torch.uint8))
    sbits = torch.stack([torch.arange(254), torch.arange(253, -1, -1)], 1)  # [254, 2]
    sbits = torch.where(sbits >= 0x7F, sbits + 1, sbits).to(torch.uint8)  # skip 0x7F, keep 0x80..0xFE
    scales = sbits.view(torch.float8_e4m3fn)
    eye = torch.eye(32)
    got = nvfp4_linear_triton(eye, packed, scales, 1.0)
    assert torch.equal(got.t(), dequantize_nvfp4(packed, scales, 1.0)), "decode tables"
    # the NaN scale byte poisons its output column, as in the reference
    scales_nan = scales.clone()
    scales_nan.view(torch.uint8)[3, 0] = 0x7F
    got = nvfp4_linear_triton(eye, packed, scales_nan, 1.0)
    assert got[:, 3].isnan().all() and not got[:, :3].isnan().any()

    # leading dims, fp16, a non-contiguous x, a float global scale, a strided bias
    packed, scales, gs = weight(40, 64, False)
    x = torch.randn(2, 3, 64, generator=g).half()
    y = nvfp4_linear(x, packed, scales, gs.item(), backend="triton")
    assert y.shape == (2, 3, 40) and y.dtype == torch.float16
    check("fp16 3-d", y, nvfp4_linear(x, packed, scales, gs, backend="torch"), torch.float16)
    xt = torch.randn(64, 5, generator=g).t()  # [5, 64] with stride (1, 5)
    bias = torch.randn(40, 2, generator=g)[:, 1]
    check("strided", nvfp4_linear_triton(xt, packed, scales, gs, bias),
          nvfp4_linear(xt, packed, scales, gs, bias, backend="torch"), torch.float32)
    print("TRITON_OK", cases)
""")


@needs_triton
def test_triton_nvfp4_linear_under_interpreter():
    run_under_interpreter(NVFP4_TRITON_SCRIPT, "TRITON_OK 290")
