"""The one-call native MoE layer (hylm/ops/csrc/moe_rows.c via hylm.ops.moe.native_moe_rows) against a float64
loop over tokens (routing, chosen experts, latent projections, shared expert written out by hand), with row- and
column-major projection weights, odd sizes, with and without latent projections and a shared expert; the
model's MoE layer with it and without it; engine outputs with it and without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hylm.model import moe as moe_model
from hylm.ops import moe as moe_ops
from hylm.ops import native

from engine_models import TINY, random_prompts, run_staggered, tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native CPU kernels are not built")


def loop_reference(x, router, bias, top_k, normalize, scaling, up, down, fc1, fc2, shared_up, shared_down):
    """float64, one token at a time."""
    x, router = x.double(), router.double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for r in range(x.shape[0]):
        scores = [1.0 / (1.0 + torch.exp(-(router[e] @ x[r])).item()) for e in range(router.shape[0])]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        ids = sorted(range(len(scores)), key=lambda e: -choice[e])[:top_k]
        w = [scores[e] for e in ids]
        if normalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        h = fc1.double() @ x[r] if fc1 is not None else x[r]
        y = sum(wj * scaling * (down[e].double() @ torch.relu(up[e].double() @ h) ** 2) for wj, e in zip(w, ids))
        out[r] = fc2.double() @ y if fc2 is not None else y
        if shared_up is not None:
            out[r] += shared_down.double() @ torch.relu(shared_up.double() @ x[r]) ** 2
    return out


def case(rows, d, e, k, inter, latent, shared, column_major, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def weight(out_f, in_f):  # a Linear weight, stored as the CPU loader stores it when column_major
        w = rnd(out_f, in_f, scale=in_f ** -0.5)
        return w.t().contiguous().t() if column_major else w

    lat = latent or d
    return dict(
        x=rnd(rows, d), router=rnd(e, d, scale=d ** -0.5), bias=rnd(e, scale=0.1), top_k=k,
        up=rnd(e, inter, lat, scale=lat ** -0.5), down=rnd(e, lat, inter, scale=inter ** -0.5),
        fc1=weight(latent, d) if latent else None, fc2=weight(d, latent) if latent else None,
        shared_up=weight(shared, d) if shared else None, shared_down=weight(d, shared) if shared else None)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [
    # d, experts, top_k, expert size, latent, shared, column-major projections
    (64, 8, 2, 32, 24, 48, True),  # engine tests' shape
    (192, 8, 2, 96, 96, 384, True),  # hylm-tiny's MoE
    (36, 5, 3, 7, None, 20, False),  # odd sizes: no tile fits, no latent projection
    (40, 6, 6, 12, 16, None, False),  # every expert chosen, no shared expert
    (48, 16, 1, 33, 20, 50, True),
])
@pytest.mark.parametrize("normalize,scaling", [(True, 2.5), (False, 1.0)])
def test_native_moe_matches_float64_loop(rows, shape, normalize, scaling):
    d, e, k, inter, latent, shared, colmajor = shape
    c = case(rows, d, e, k, inter, latent, shared, colmajor, seed=rows * 31 + d)
    args = (c["x"], c["router"], c["bias"], k, normalize, scaling, c["up"], c["down"], c["fc1"], c["fc2"],
            c["shared_up"], c["shared_down"])
    want = loop_reference(*args)
    names = dict(fc1=c["fc1"], fc2=c["fc2"], shared_up=c["shared_up"], shared_down=c["shared_down"])
    assert moe_ops.native_moe_ok(c["x"], c["router"], c["up"], c["down"], **names)
    got = moe_ops.native_moe_rows(c["x"], c["router"], c["bias"], k, normalize, scaling, c["up"], c["down"], **names)
    assert got.shape == (rows, d) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # the PyTorch composition the model runs elsewhere agrees with the same loop
    torch.testing.assert_close(moe_ops.moe_reference(*args).double(), want, rtol=1e-4, atol=1e-5)


def test_native_moe_refuses_what_it_cannot_run():
    c = case(2, 64, 8, 2, 32, 24, 48, True, seed=1)
    w = dict(fc1=c["fc1"], fc2=c["fc2"], shared_up=c["shared_up"], shared_down=c["shared_down"])
    x = c["x"]
    assert moe_ops.native_moe_ok(x, c["router"], c["up"], c["down"], **w)
    assert not moe_ops.native_moe_ok(torch.randn(9, 64), c["router"], c["up"], c["down"], **w)  # too many rows
    assert not moe_ops.native_moe_ok(x, c["router"], c["up"], c["down"], n_group=2, **w)  # grouped routing
    assert not moe_ops.native_moe_ok(x.double(), c["router"], c["up"], c["down"], **w)
    assert not moe_ops.native_moe_ok(x, c["router"], c["up"].transpose(1, 2), c["down"], **w)  # experts strided
    up = c["up"].clone().requires_grad_()
    assert not moe_ops.native_moe_ok(x, c["router"], up, c["down"], **w)  # autograd wants the torch path
    with pytest.raises(RuntimeError, match="refused"):  # a latent size that disagrees with the projections
        moe_ops.native_moe_rows(x, c["router"], None, 2, True, 1.0, c["up"][:, :, :8].contiguous(),
                                c["down"][:, :8].contiguous(), fc1=None, fc2=None)


UNGROUPED = dataclasses.replace(TINY, n_group=1, topk_group=1)


def test_model_moe_layer_with_and_without_native_kernel(monkeypatch):
    model = tiny_model(seed=3, config=UNGROUPED)
    layer = next(m for m in model.modules() if isinstance(m, moe_model.MoE))
    calls = []
    original = moe_model.native_moe_rows
    monkeypatch.setattr(moe_model, "native_moe_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    for rows in (1, 4, 8, 9):
        x = torch.randn(rows, UNGROUPED.hidden_size, generator=torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            calls.clear()
            got = layer(x)
            assert len(calls) == (rows <= 8)
            monkeypatch.setattr(moe_ops, "native_enabled", False)
            want = layer(x)
            monkeypatch.setattr(moe_ops, "native_enabled", True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_engine_outputs_with_and_without_native_moe(monkeypatch):
    model = tiny_model(seed=4, config=UNGROUPED)
    prompts = random_prompts(5, 3, 40, seed=33)
    from hylm.engine.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    calls = []
    original = moe_model.native_moe_rows
    monkeypatch.setattr(moe_model, "native_moe_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    with_native, _ = run_staggered(model, prompts, params, 2, max_num_batched_tokens=16, block_size=4)
    assert calls
    monkeypatch.setattr(moe_ops, "native_enabled", False)
    calls.clear()
    without, _ = run_staggered(model, prompts, params, 2, max_num_batched_tokens=16, block_size=4)
    assert not calls and with_native == without
