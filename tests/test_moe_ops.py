"""Expert dispatch (hylm.ops.moe.grouped_expert_mlp) against a float64 loop over tokens and their experts,
on both paths: one token (its k experts in turn) and several (tokens sorted per expert)."""

from __future__ import annotations

import pytest
import torch

from hylm.ops import moe as moe_ops


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


@pytest.mark.parametrize("n,k", [(1, 2), (1, 4), (3, 2), (4, 3), (17, 2), (40, 4)])
def test_dispatch_matches_the_float64_loop(n, k):
    x, weights, ids, up, down = case(n, k, seed=n * 10 + k)
    got = moe_ops.grouped_expert_mlp(x, weights, ids, up, down)
    assert got.shape == (n, down.shape[1]) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), reference(x, weights, ids, up, down), rtol=1e-5, atol=1e-5)
