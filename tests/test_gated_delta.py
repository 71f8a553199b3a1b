"""Gated delta rule ops (recurrent, chunked, Triton recurrent) against a float64 token-by-token loop."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import needs_triton, run_under_interpreter

from hylm.ops.gated_delta import gated_delta_chunked, gated_delta_recurrent, l2norm

TOL = 1e-5


# ---------------------------------------------------------------------------------------------------
# the reference: one head, one token at a time, float64, written straight from the definition
# ---------------------------------------------------------------------------------------------------

def reference(q, k, v, g, beta, scale=None, initial_state=None, head_map="grouped", l2norm_qk=False,
              cu_seqlens=None):
    """Returns (o [B, T, Hv, V], final states [N, Hv, K, V], all states [B, T, Hv, K, V]), float64."""
    q, k, v, g, beta = (x.detach().to(torch.float64) for x in (q, k, v, g, beta))
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    ratio = Hv // Hk
    scale = K ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens.tolist()
        seqs = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    o = torch.zeros(B, T, Hv, V, dtype=torch.float64)
    states = torch.zeros(B, T, Hv, K, V, dtype=torch.float64)
    finals = torch.zeros(len(seqs), Hv, K, V, dtype=torch.float64)
    for n, (b, lo, hi) in enumerate(seqs):
        for h in range(Hv):
            hk = h // ratio if head_map == "grouped" else h % Hk
            S = (torch.zeros(K, V, dtype=torch.float64) if initial_state is None
                 else initial_state[n, h].detach().to(torch.float64).clone())
            for t in range(lo, hi):
                qt, kt = q[b, t, hk], k[b, t, hk]
                if l2norm_qk:
                    qt = qt / torch.sqrt((qt * qt).sum() + 1e-6)
                    kt = kt / torch.sqrt((kt * kt).sum() + 1e-6)
                if g.dim() == 3:
                    S = torch.exp(g[b, t, h]) * S
                else:
                    S = torch.diag(torch.exp(g[b, t, h])) @ S
                u = beta[b, t, h] * (v[b, t, h] - S.T @ kt)
                S = S + torch.outer(kt, u)
                o[b, t, h] = S.T @ (qt * scale)
                states[b, t, h] = S
            finals[n, h] = S
    return o, finals, states


def make_inputs(B=2, T=37, Hk=2, Hv=4, K=8, V=6, kda=False, seed=0, state=False, n_seqs=None,
                strong_decay=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, K, generator=gen)
    k = l2norm(torch.randn(B, T, Hk, K, generator=gen))  # the delta rule is stable for |k| <= 1
    v = torch.randn(B, T, Hv, V, generator=gen)
    gshape = (B, T, Hv, K) if kda else (B, T, Hv)
    g = -F.softplus(torch.randn(gshape, generator=gen) - 1.0)
    if strong_decay:  # a few gates that wipe the state out, far beyond exp's fp32 range when summed
        g = torch.where(torch.rand(gshape, generator=gen) < 0.1, -60.0 * torch.rand(gshape, generator=gen), g)
    beta = torch.sigmoid(torch.randn(B, T, Hv, generator=gen))
    s0 = torch.randn(n_seqs or B, Hv, K, V, generator=gen) if state else None
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [s0]


def assert_close(actual, expected, tol=TOL, what=""):
    actual = actual.detach().to(torch.float64)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    limit = tol * max(1.0, expected.abs().max().item())
    assert err <= limit, f"{what}: max abs err {err:.3e} > {limit:.3e}"


def run_form(form, *args, **kw):
    if form == "chunked":
        kw.setdefault("chunk_size", 16)
        kw.setdefault("kda_block", 4)
        return gated_delta_chunked(*args, **kw)
    return gated_delta_recurrent(*args, backend="torch", **kw)


FORMS = ["recurrent", "chunked"]


# ---------------------------------------------------------------------------------------------------
# torch forms
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kda", [False, True], ids=["scalar", "kda"])
@pytest.mark.parametrize("hk,hv,head_map", [(4, 4, "grouped"), (2, 4, "grouped"), (2, 6, "tiled"), (1, 3, "tiled")])
def test_matches_reference(form, kda, hk, hv, head_map):
    q, k, v, g, beta, s0 = make_inputs(B=2, T=37, Hk=hk, Hv=hv, kda=kda, state=True, seed=hk * 10 + hv)
    o, st = run_form(form, q, k, v, g, beta, initial_state=s0, head_map=head_map)
    ro, rs, _ = reference(q, k, v, g, beta, initial_state=s0, head_map=head_map)
    assert o.dtype == torch.float32 and st.dtype == torch.float32
    assert_close(o, ro, what="o")
    assert_close(st, rs, what="state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [1, 15, 16, 17, 50])
def test_lengths_around_the_chunk(form, T):
    q, k, v, g, beta, _ = make_inputs(B=1, T=T, kda=(T % 2 == 1), seed=T)
    o, st = run_form(form, q, k, v, g, beta)
    ro, rs, _ = reference(q, k, v, g, beta)
    assert_close(o, ro, what="o")
    assert_close(st, rs, what="state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kda", [False, True], ids=["scalar", "kda"])
def test_strong_decays_stay_exact(form, kda):
    q, k, v, g, beta, s0 = make_inputs(B=1, T=40, kda=kda, state=True, strong_decay=True, seed=3)
    o, st = run_form(form, q, k, v, g, beta, initial_state=s0)
    ro, rs, _ = reference(q, k, v, g, beta, initial_state=s0)
    assert_close(o, ro, what="o")
    assert_close(st, rs, what="state")


@pytest.mark.parametrize("form", FORMS)
def test_l2norm_scale_and_unnormalised_q(form):
    q, k, v, g, beta, _ = make_inputs(B=2, T=21, Hk=2, Hv=4, seed=5)
    k = k * 3.0  # normalised again inside
    o, st = run_form(form, q, k, v, g, beta, scale=0.7, l2norm_qk=True)
    ro, rs, _ = reference(q, k, v, g, beta, scale=0.7, l2norm_qk=True)
    assert_close(o, ro, what="o")
    assert_close(st, rs, what="state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kda", [False, True], ids=["scalar", "kda"])
def test_varlen_with_initial_states(form, kda):
    lens = [5, 0, 33, 1, 17]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    q, k, v, g, beta, s0 = make_inputs(B=1, T=sum(lens), Hk=2, Hv=4, kda=kda, state=True, n_seqs=len(lens), seed=7)
    o, st = run_form(form, q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, head_map="tiled")
    ro, rs, _ = reference(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, head_map="tiled")
    assert_close(o, ro, what="o")
    assert_close(st, rs, what="state")
    # every sequence equals its own dense run
    for i, n in enumerate(lens):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        oi, sti = run_form(form, q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=s0[i: i + 1],
                           head_map="tiled")
        torch.testing.assert_close(o[:, sl], oi, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st[i: i + 1], sti, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs(form):
    gen = torch.Generator().manual_seed(11)
    B, T, Hk, Hv, K, V = 2, 19, 2, 4, 8, 6
    # q|k|v as slices of one fused projection (the mixer's layout), time-major storage for beta and g
    fused = torch.randn(B, T, 2 * Hk * K + Hv * V + 5, generator=gen)
    q = fused[..., : Hk * K].unflatten(-1, (Hk, K))
    fused[..., Hk * K: 2 * Hk * K] = l2norm(fused[..., Hk * K: 2 * Hk * K].unflatten(-1, (Hk, K))).flatten(-2)
    k = fused[..., Hk * K: 2 * Hk * K].unflatten(-1, (Hk, K))
    v = fused[..., 2 * Hk * K: 2 * Hk * K + Hv * V].unflatten(-1, (Hv, V))
    g = -F.softplus(torch.randn(Hv, T, B, K, generator=gen)).permute(2, 1, 0, 3)  # KDA, permuted view
    beta = torch.sigmoid(torch.randn(T, B, Hv, generator=gen)).transpose(0, 1)
    s0 = torch.randn(B, Hv, V, K, generator=gen).transpose(-1, -2)
    assert not any(x.is_contiguous() for x in (q, k, v, g, beta, s0))
    o, st = run_form(form, q, k, v, g, beta, initial_state=s0)
    ro, rs, _ = reference(q, k, v, g, beta, initial_state=s0)
    assert_close(o, ro, what="o")
    assert_close(st, rs, what="state")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kda", [False, True], ids=["scalar", "kda"])
def test_all_states_for_rollback(form, kda):
    lens = [9, 20]
    cu = torch.tensor([0, 9, 29])
    q, k, v, g, beta, s0 = make_inputs(B=1, T=29, Hk=1, Hv=2, kda=kda, state=True, n_seqs=2, seed=13)
    o, st, every = run_form(form, q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, return_all_states=True)
    ro, rs, rall = reference(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu)
    assert every.shape == (1, 29, 2, 8, 6)
    assert_close(every, rall, what="all states")
    assert_close(st, rs, what="state")
    # rollback: restarting from the state after token 4 of sequence 1 reproduces the rest
    o2, st2 = run_form(form, q[:, 14:], k[:, 14:], v[:, 14:], g[:, 14:], beta[:, 14:], initial_state=every[:, 13])
    torch.testing.assert_close(o2, o[:, 14:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st2, st[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_bf16_inputs_accumulate_in_fp32(form):
    q, k, v, g, beta, s0 = make_inputs(B=1, T=40, kda=False, state=True, seed=17, dtype=torch.bfloat16)
    o, st = run_form(form, q, k, v, g, beta, initial_state=s0)
    assert o.dtype == torch.bfloat16 and st.dtype == torch.float32
    ro, rs, _ = reference(q, k, v, g, beta, initial_state=s0)  # the same bf16 values, exact math
    assert_close(st, rs, what="state")  # fp32 state: no bf16 rounding accumulates over the 40 steps
    assert_close(o, ro, tol=1e-2, what="o")  # only the final rounding to bf16


def test_forms_agree_on_longer_sequence_and_chunk_sizes():
    q, k, v, g, beta, s0 = make_inputs(B=1, T=300, Hk=2, Hv=4, K=16, V=16, kda=True, state=True, seed=19)
    ro, rs = gated_delta_recurrent(q, k, v, g, beta, initial_state=s0, backend="torch")
    for cs, blk, slab in [(64, 16, None), (32, 8, 64), (8, 8, None)]:
        o, st = gated_delta_chunked(q, k, v, g, beta, initial_state=s0, chunk_size=cs, kda_block=blk,
                                    slab_tokens=slab)
        torch.testing.assert_close(o, ro, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(st, rs, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("fallback", [False, True], ids=["factored", "exact-loop"])
def test_kda_pair_products_both_paths(monkeypatch, fallback):
    import hylm.ops.gated_delta as gd
    if fallback:
        monkeypatch.setattr(gd, "KDA_FACTOR_LIMIT", -1.0)
    gen = torch.Generator().manual_seed(23)
    C, K, blk = 16, 5, 4
    qk = torch.randn(2, 3, C, K, generator=gen, dtype=torch.float64)
    k = torch.randn(3, C, K, generator=gen, dtype=torch.float64)
    g = -torch.rand(3, C, K, generator=gen, dtype=torch.float64) * 3
    got = gd._kda_pairs(qk, k, g, blk)
    want = torch.zeros(2, 3, C, C, dtype=torch.float64)
    for i in range(C):
        for j in range(i + 1):
            want[:, :, i, j] = (qk[:, :, i] * k[:, j] * torch.exp(g[:, j + 1: i + 1].sum(1))).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_unit_lower_inverse():
    from hylm.ops.gated_delta import _unit_lower_inverse
    gen = torch.Generator().manual_seed(29)
    for C in (5, 16, 40):
        a = torch.randn(3, C, C, generator=gen, dtype=torch.float64).tril(-1) * 0.3
        t = _unit_lower_inverse(a, blk=16)
        eye = torch.eye(C, dtype=torch.float64)
        torch.testing.assert_close(t @ (eye + a), eye.expand(3, C, C))


def test_rejects_bad_shapes():
    q, k, v, g, beta, _ = make_inputs(B=1, T=4, Hk=2, Hv=3)
    with pytest.raises(ValueError, match="multiple"):
        gated_delta_recurrent(q, k, v, g, beta)
    q, k, v, g, beta, _ = make_inputs(B=1, T=4)
    with pytest.raises(ValueError, match="head_map"):
        gated_delta_chunked(q, k, v, g, beta, head_map="strided")
    with pytest.raises(ValueError, match="cu_seqlens"):
        gated_delta_chunked(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 2, 3]))


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    import hylm.ops.gated_delta as gd
    assert gd._use_triton("auto", torch.zeros(1)) is False


# ---------------------------------------------------------------------------------------------------
# Triton recurrent kernel, run by the interpreter on the CPU in a subprocess (TRITON_INTERPRET must be
# set before triton is imported, and must not leak into other tests)
# ---------------------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import torch, test_gated_delta as t
    from hylm.ops.gated_delta import gated_delta_recurrent
    cases = 0
    def check(name, args, kw, ref_kw):
        global cases
        res = gated_delta_recurrent(*args, backend="triton", **kw)
        ro, rs, rall = t.reference(*args, **ref_kw)
        t.assert_close(res[0], ro, tol=1e-2 if res[0].dtype == torch.bfloat16 else t.TOL, what=name + " o")
        t.assert_close(res[1], rs, what=name + " state")
        if kw.get("return_all_states"):
            t.assert_close(res[2], rall, what=name + " all states")
        cases += 1
    for kda in (False, True):
        for hk, hv, hm in ((2, 4, "grouped"), (2, 4, "tiled")):
            q, k, v, g, beta, s0 = t.make_inputs(B=2, T=7, Hk=hk, Hv=hv, kda=kda, state=True, seed=hv + kda)
            kw = dict(initial_state=s0, head_map=hm)
            check(f"kda={kda} {hm}", (q, k, v, g, beta), kw, kw)
    # varlen, all states, l2norm + scale, V larger than one V block
    cu = torch.tensor([0, 3, 3, 9])
    q, k, v, g, beta, s0 = t.make_inputs(B=1, T=9, Hk=1, Hv=2, V=40, kda=True, state=True, n_seqs=3, seed=1)
    kw = dict(initial_state=s0, cu_seqlens=cu, scale=0.5, l2norm_qk=True)
    check("varlen", (q, k * 2, v, g, beta), dict(kw, return_all_states=True), kw)
    # non-contiguous views, no initial state, bf16
    q, k, v, g, beta, _ = t.make_inputs(B=2, T=5, Hk=2, Hv=2, K=6, seed=2, dtype=torch.bfloat16)
    fused = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
    qv, kv, vv = (fused[..., a:a + 12].unflatten(-1, (2, 6)) for a in (0, 12, 24))
    check("strided bf16", (qv, kv, vv, g.transpose(0, 1).contiguous().transpose(0, 1), beta), {}, {})
    print("TRITON_OK", cases)
""")


@needs_triton
def test_triton_recurrent_under_interpreter():
    run_under_interpreter(TRITON_SCRIPT, "TRITON_OK 6")
