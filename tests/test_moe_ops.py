"""Expert dispatch (hylm.ops.moe.grouped_expert_mlp) against a float64 loop over tokens and their experts,
on every path: one token (its k experts in turn), several (tokens sorted per expert) and few tokens over
small experts (every expert computed, unchosen ones weighted 0), and the fused Triton kernels under the
interpreter."""

from __future__ import annotations

import textwrap

import pytest
import torch

from triton_interpreter import needs_triton, run_under_interpreter

from hylm.ops import moe as moe_ops


dense_path = moe_ops.dense_expert_mlp


@pytest.mark.parametrize("n,k,repeat", [(2, 2, False), (3, 2, False), (5, 4, False), (4, 3, True)])
def test_dense_path_matches_the_float64_loop(n, k, repeat):
    x, weights, ids, up, down = case(n, k, seed=n + 100 * k)
    if repeat:  # one token naming an expert twice counts it twice, as the loop does
        ids[:, -1] = ids[:, 0]
    got = moe_ops.dense_expert_mlp(x, weights, ids, up, down)
    assert got.shape == (n, down.shape[1]) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), reference(x, weights, ids, up, down), rtol=1e-5, atol=1e-5)


def reference(x, weights, ids, up, down):
    x, up, down, weights = x.double(), up.double(), down.double(), weights.double()
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += weights[t, j] * (down[e] @ torch.relu(up[e] @ x[t]) ** 2)
    return out


def case(n, k, experts=8, d=24, inter=40, d_out=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    up = torch.randn(experts, inter, d, generator=g) / d ** 0.5
    down = torch.randn(experts, d_out, inter, generator=g) / inter ** 0.5
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])  # distinct per token
    weights = torch.rand(n, k, generator=g)
    return x, weights, ids, up, down


# 8 experts of 40 x 24: dense while n * k >= 8 and n * 40 * 24 <= DENSE_MAX_MACS_PER_EXPERT; inter=800 (17 tokens) and
# 400 (40) are past it
@pytest.mark.parametrize("n,k,inter,dense", [(1, 2, 40, False), (1, 4, 40, False), (3, 2, 40, False), (4, 3, 40, True),
                                               (17, 2, 40, True), (40, 4, 400, False), (17, 2, 800, False)])
def test_dispatch_matches_the_float64_loop(n, k, inter, dense, monkeypatch):
    x, weights, ids, up, down = case(n, k, inter=inter, seed=n * 10 + k)
    calls = []
    monkeypatch.setattr(moe_ops, "dense_expert_mlp", lambda *a: calls.append(1) or dense_path(*a))
    got = moe_ops.grouped_expert_mlp(x, weights, ids, up, down)
    assert bool(calls) == dense
    assert got.shape == (n, down.shape[1]) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), reference(x, weights, ids, up, down), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,experts,inter", [(3, 2, 8, 40), (17, 2, 8, 800), (40, 4, 16, 400), (300, 3, 8, 64)])
def test_padded_and_looped_experts_match_the_float64_loop(n, k, experts, inter, monkeypatch):
    """Past the dense path: the padded two-bmm path while padding waste is bounded, else the per-expert loop;
    both equal the float64 loop."""
    x, weights, ids, up, down = case(n, k, experts=experts, inter=inter, seed=n + k)
    monkeypatch.setattr(moe_ops, "DENSE_MAX_MACS_PER_EXPERT", 0)
    calls = []
    padded = moe_ops.padded_expert_mlp
    monkeypatch.setattr(moe_ops, "padded_expert_mlp", lambda *a: calls.append(1) or padded(*a))
    ref = reference(x, weights, ids, up, down)
    got = moe_ops.grouped_expert_mlp(x, weights, ids, up, down)
    assert calls  # tokens spread over the experts: little padding
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(moe_ops, "PADDED_MAX_WASTE", 0)
    calls.clear()
    looped = moe_ops.grouped_expert_mlp(x, weights, ids, up, down)
    assert not calls
    torch.testing.assert_close(looped.double(), ref, rtol=1e-5, atol=1e-5)


def test_backend_choice_on_cpu():
    x, weights, ids, up, down = case(3, 2, seed=7)
    assert moe_ops._use_triton("auto", x) is False
    torch.testing.assert_close(moe_ops.grouped_expert_mlp(x, weights, ids, up, down, backend="torch"),
                               moe_ops.grouped_expert_mlp(x, weights, ids, up, down))
    with pytest.raises(ValueError, match="backend"):
        moe_ops.grouped_expert_mlp(x, weights, ids, up, down, backend="cuda")


# ---------------------------------------------------------------------------------------------------
# Triton fused experts, run by the interpreter on the CPU in a subprocess (TRITON_INTERPRET must be set
# before triton is imported, and must not leak into other tests)
# ---------------------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import torch, test_moe_ops as t
    from hylm.ops.moe import grouped_expert_mlp
    from hylm.ops.triton_moe import fused_moe_triton
    cases = 0
    def check(name, x, weights, ids, up, down, tol=1e-5, **kw):
        global cases
        if kw:
            got = fused_moe_triton(x, weights, ids, up, down, **kw)
        else:
            got = grouped_expert_mlp(x, weights, ids, up, down, backend="triton")
        assert got.shape == (x.shape[0], down.shape[1]) and got.dtype == x.dtype, name
        ref = t.reference(x, weights, ids, up, down)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, msg=lambda m: name + ": " + m)
        cases += 1
    # sizes off the 16-wide tiles: D=24, I=40, D_out=20; with 4-8 experts and 1-37 tokens some get none
    for n in (1, 5, 37):
        for k in (1, 2, 4):
            for e in (4, 8):
                x, w, ids, up, down = t.case(n, k, experts=e, d=24, inter=40, d_out=20, seed=n * 100 + k * 10 + e)
                check(f"n={n} k={k} e={e}", x, w, ids, up, down)
    # only experts 2 and 5 chosen, the first and last experts idle; each token names one expert twice
    x, w, ids, up, down = t.case(6, 4, experts=8, d=24, inter=40, d_out=20, seed=1)
    ids = torch.tensor([2, 5, 2, 5]).repeat(6, 1)
    check("idle experts, repeats", x, w, ids, up, down)
    x, w, ids, up, down = t.case(37, 4, experts=8, d=24, inter=40, d_out=20, seed=2)
    ids[:, -1] = ids[:, 0]
    check("repeat", x, w, ids, up, down)
    # several row blocks per expert, several K steps and output tiles, strided views of every operand
    x, w, ids, up, down = t.case(37, 4, experts=4, d=72, inter=136, d_out=70, seed=3)
    xs = torch.cat([x, x], 1)[:, ::2]
    ups = up.transpose(1, 2).contiguous().transpose(1, 2)
    downs = torch.cat([down, down], 0)[::2]
    ws = w.t().contiguous().t()
    check("blocks of 16, strided", xs, ws, ids, ups, downs, block_m=16)
    # bf16 activations and experts, fp32 routing weights; h is stored in bf16, so a looser tolerance
    x, w, ids, up, down = t.case(37, 2, experts=8, d=24, inter=40, d_out=20, seed=4)
    x, up, down = x.bfloat16(), up.bfloat16(), down.bfloat16()
    ids[:3, 1] = ids[:3, 0]
    check("bf16", x, w, ids, up, down, tol=2e-2)
    # no assignments at all (an expert-parallel rank that owns none of the chosen experts)
    x, w, ids, up, down = t.case(2, 1, seed=5)
    check("empty", x[:0], w[:0], ids[:0], up, down)
    print("TRITON_OK", cases)
""")


@needs_triton
def test_triton_fused_experts_under_interpreter():
    run_under_interpreter(TRITON_SCRIPT, "TRITON_OK 23")
