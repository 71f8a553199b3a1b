"""The fused native Mamba-2 decode step against the composition of hylm's reference ops."""

import math

import pytest
import torch
import torch.nn.functional as F

from hylm.ops import native
from hylm.ops.conv1d import causal_conv1d, causal_conv1d_step, conv_states_after_each
from hylm.ops.mamba_step import mamba_decode_step
from hylm.ops.ssd import ssd_step, ssd_steps

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: native kernels not built")


@pytest.mark.parametrize("heads,head_dim,groups,state,kernel,with_bias,limits", [
    (12, 32, 2, 32, 4, True, (0.0, math.inf)),     # hylm-tiny's mixer
    (8, 64, 8, 128, 4, False, (0.001, 0.1)),       # Super's state size and groups, clamped dt
    (4, 16, 1, 8, 2, True, (0.0, 0.05)),
])
def test_native_step_matches_reference_ops(heads, head_dim, groups, state, kernel, with_bias, limits):
    g = torch.Generator().manual_seed(heads * state)
    b, slots_total = 3, 6
    c = heads * head_dim + 2 * groups * state
    proj = torch.randn(b, c + heads + 5, generator=g)  # xbc and dt are strided views, as in the mixer
    xbc, dt = proj[:, :c], proj[:, c: c + heads]
    conv_w = torch.randn(c, kernel, generator=g) * 0.5
    conv_b = torch.randn(c, generator=g) if with_bias else None
    dt_bias, a_log, d = torch.randn(heads, generator=g), torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    a = -torch.exp(a_log)
    conv_pool = torch.randn(slots_total, c, kernel - 1, generator=g)
    ssm_pool = torch.randn(slots_total, heads, head_dim, state, generator=g)
    slots = torch.tensor([4, 1, 3])

    ref_conv, ref_ssm = conv_pool.clone(), ssm_pool.clone()
    h = causal_conv1d_step(xbc.contiguous(), conv_w, conv_b, ref_conv, state_indices=slots, silu=True,
                           backend="torch")  # [b, C]
    dt_ref = F.softplus(dt + dt_bias).clamp(*limits)
    xs, bm, cm = h.split([heads * head_dim, groups * state, groups * state], dim=-1)
    y_ref = ssd_step(ref_ssm, xs.view(b, heads, head_dim), dt_ref, a, bm.view(b, groups, state),
                     cm.view(b, groups, state), d, state_indices=slots, backend="torch")

    y, _, _ = mamba_decode_step(xbc, dt, conv_pool, conv_w, conv_b, dt_bias, a, d, limits, ssm_pool, slots, groups)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv_pool, ref_conv, rtol=0, atol=0)  # the shift is exact
    torch.testing.assert_close(ssm_pool, ref_ssm, rtol=1e-5, atol=1e-5)
    untouched = [0, 2, 5]
    assert torch.equal(conv_pool[untouched], ref_conv[untouched])


@pytest.mark.parametrize("tokens", [1, 4, 6])
def test_native_steps_keep_every_state_like_the_reference(tokens):
    """Speculative verification: t tokens per sequence, the states after every token kept (the reference is
    the mixer's keep path: conv_states_after_each, the causal conv from the state, ssd_steps)."""
    g = torch.Generator().manual_seed(tokens)
    heads, head_dim, groups, state, kernel, b = 12, 32, 2, 32, 4, 2
    c = heads * head_dim + 2 * groups * state
    proj = torch.randn(b * tokens, c + heads, generator=g)
    xbc, dt = proj[:, :c], proj[:, c:]
    conv_w, conv_b = torch.randn(c, kernel, generator=g) * 0.5, torch.randn(c, generator=g)
    dt_bias, a, d = torch.randn(heads, generator=g), -torch.rand(heads, generator=g), torch.randn(heads, generator=g)
    conv_pool = torch.randn(4, c, kernel - 1, generator=g)
    ssm_pool = torch.randn(4, heads, head_dim, state, generator=g)
    slots = torch.tensor([2, 0])

    x3 = xbc.reshape(b, tokens, c)
    conv0, ssm0 = conv_pool[slots].clone(), ssm_pool[slots].clone()
    convs_ref = conv_states_after_each(x3, conv0)  # [b, t, C, K-1]
    h, _ = causal_conv1d(x3, conv_w, conv_b, conv0.clone())
    h = F.silu(h)
    xs, bm, cm = h.split([heads * head_dim, groups * state, groups * state], dim=-1)
    dt_ref = F.softplus(dt.reshape(b, tokens, heads) + dt_bias)
    y_ref, ssms_ref = ssd_steps(ssm0, xs.reshape(b, tokens, heads, head_dim), dt_ref, a,
                                bm.reshape(b, tokens, groups, state), cm.reshape(b, tokens, groups, state), d)

    y, convs, ssms = mamba_decode_step(xbc, dt, conv_pool, conv_w, conv_b, dt_bias, a, d, (0.0, math.inf),
                                       ssm_pool, slots, groups, tokens=tokens, keep_states=True)
    torch.testing.assert_close(y.view(b, tokens, heads, head_dim), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(convs, convs_ref, rtol=0, atol=0)
    torch.testing.assert_close(ssms, ssms_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm_pool[slots], ssms_ref[:, -1], rtol=1e-5, atol=1e-5)  # the pool: last state
    torch.testing.assert_close(conv_pool[slots], convs_ref[:, -1], rtol=0, atol=0)


def test_engine_outputs_equal_with_and_without_the_native_step(monkeypatch):
    """Greedy tokens and logprobs of staggered requests (fresh one-token prompts included) are the same
    with the fused step as with the reference ops. (Whole fused blocks are off here: they are
    tests/test_native_blocks.py's; this checks the mixer's own step.)"""
    import hylm.model.mamba2 as mamba2
    from engine_models import assert_runs_agree, logprob_runs, random_prompts, tiny_model

    from hylm.engine.sampling_params import SamplingParams
    from hylm.model import fused

    monkeypatch.setattr(fused, "enabled", False)
    model = tiny_model()
    prompts = random_prompts(5, 1, 30, seed=41) + [[7]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    calls = []
    original = mamba2.mamba_decode_step
    monkeypatch.setattr(mamba2, "mamba_decode_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    with_step = logprob_runs(model, prompts, params, block_size=4, max_num_seqs=3)
    assert calls  # the decode steps went through the fused kernel
    monkeypatch.setattr(mamba2, "native_step_enabled", False)
    calls.clear()
    reference = logprob_runs(model, prompts, params, block_size=4, max_num_seqs=3)
    assert not calls
    assert_runs_agree(with_step, reference)


@pytest.mark.parametrize("tokens,b", [(300, 2), (700, 1), (37, 3)])
def test_native_recurrence_over_a_prompt_matches_float64(tokens, b):
    """Prefill takes the same kernel as decode: the recurrence token by token from each slot's state. Against
    the conv and the SSM recurrence in float64 (ssd_reference) from the same states."""
    g = torch.Generator().manual_seed(tokens)
    heads, head_dim, groups, state, kernel = 8, 32, 2, 16, 4
    c = heads * head_dim + 2 * groups * state
    proj = torch.randn(b * tokens, c + heads + 3, generator=g)
    xbc, dt = proj[:, :c], proj[:, c: c + heads]
    conv_w, conv_b = torch.randn(c, kernel, generator=g) * 0.5, torch.randn(c, generator=g)
    dt_bias, a, d = torch.randn(heads, generator=g), -torch.rand(heads, generator=g) * 4, torch.randn(heads, generator=g)
    conv_pool = torch.randn(5, c, kernel - 1, generator=g)
    ssm_pool = torch.randn(5, heads, head_dim, state, generator=g)
    slots = torch.tensor([3, 0, 4][:b])

    f64 = torch.float64
    x3 = xbc.reshape(b, tokens, c).to(f64)
    h, conv_final = causal_conv1d(x3, conv_w.to(f64), conv_b.to(f64), conv_pool[slots].to(f64))
    h = F.silu(h)
    xs, bm, cm = h.split([heads * head_dim, groups * state, groups * state], dim=-1)
    dt_ref = F.softplus(dt.reshape(b, tokens, heads).to(f64) + dt_bias.to(f64))
    from hylm.ops.ssd import ssd_reference
    y_ref, ssm_final = ssd_reference(xs.reshape(b, tokens, heads, head_dim), dt_ref, a.to(f64),
                                     bm.reshape(b, tokens, groups, state), cm.reshape(b, tokens, groups, state),
                                     D=d.to(f64), initial_state=ssm_pool[slots].to(f64))

    y, _, _ = mamba_decode_step(xbc, dt, conv_pool, conv_w, conv_b, dt_bias, a, d, (0.0, math.inf), ssm_pool, slots,
                                groups, tokens=tokens)
    torch.testing.assert_close(y.view(b, tokens, heads, head_dim).to(f64), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssm_pool[slots].to(f64), ssm_final, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv_pool[slots].to(f64), conv_final, rtol=0, atol=0)  # the last inputs, exact
