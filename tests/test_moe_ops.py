"""Expert dispatch (hylm.ops.moe.grouped_expert_mlp) against a float64 loop over tokens and their experts,
on every path: one token (its k experts in turn), several (tokens sorted per expert) and few tokens over
small experts (every expert computed, unchosen ones weighted 0)."""

from __future__ import annotations

import pytest
import torch

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


# 8 experts of 40 x 24: dense while n * k >= 8 and n * 8 * 40 * 24 <= DENSE_MAX_MACS; inter=800 (17 tokens) and 400 (40) are past it
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
