"""The gated-delta mixer against transformers' Qwen3NextGatedDeltaNet with the same weights (test-only
dependency), for prefill, cached step-by-step decode, multi-token continuation and packed varlen batches."""

from __future__ import annotations

import pytest
import torch

from hylm.model.batch import Batch
from hylm.model.gated_delta_net import GatedDeltaCache, GatedDeltaNet, GatedDeltaNetConfig, packed_causal_conv1d

transformers = pytest.importorskip("transformers")
from transformers import Qwen3NextConfig  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet  # noqa: E402

ATOL = 2e-5


def make_pair(seed=0):
    config = Qwen3NextConfig(hidden_size=64, linear_num_value_heads=4, linear_num_key_heads=2,
                             linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                             num_hidden_layers=1, layer_types=["linear_attention"], num_attention_heads=2,
                             num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=100,
                             num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2)
    torch.manual_seed(seed)
    ref = Qwen3NextGatedDeltaNet(config, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial values for every parameter
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5))
        ref.A_log.copy_(torch.log(torch.rand(4) * 2 + 0.05))
        ref.norm.weight.add_(1.0)
    mine = GatedDeltaNet(config, layer_idx=0).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    mine.chunk_size = 8  # several chunks, the last one partial, in every prefill below
    return config, ref, mine


def hf_cache(config):
    return DynamicCache(config=config)


@torch.no_grad()
def test_prefill_without_cache_matches():
    config, ref, mine = make_pair()
    x = torch.randn(2, 21, 64)
    want = ref(x)
    got = mine(x.reshape(-1, 64), Batch.uniform(2, 21), None).view(2, 21, 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_prefill_then_decode_with_cache_matches():
    config, ref, mine = make_pair(seed=1)
    B, T, steps = 2, 13, 5
    x = torch.randn(B, T + steps + 6, 64)
    cache = hf_cache(config)
    mine_cache = GatedDeltaCache([mine], batch_size=B)
    want = ref(x[:, :T], cache_params=cache)
    got = mine(x[:, :T].reshape(-1, 64), Batch.uniform(B, T), mine_cache).view(B, T, 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    conv, rec = mine_cache.mamba(0)
    torch.testing.assert_close(rec, cache.layers[0].recurrent_states[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(conv, cache.layers[0].conv_states[0][..., 1:], atol=0, rtol=0)
    for s in range(steps):  # one token at a time: the recurrent form on both sides
        t = T + s
        want = ref(x[:, t: t + 1], cache_params=cache)
        got = mine(x[:, t], Batch.uniform(B, 1, context_len=t), mine_cache)
        torch.testing.assert_close(got, want[:, 0], atol=ATOL, rtol=1e-4)
    # a multi-token continuation from the cache: the chunked form with initial states
    t = T + steps
    want = ref(x[:, t:], cache_params=cache)
    got = mine(x[:, t:].reshape(-1, 64), Batch.uniform(B, 6, context_len=t), mine_cache).view(B, 6, 64)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(mine_cache.mamba(0)[1], cache.layers[0].recurrent_states[0], atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_packed_mixed_batch_matches_per_sequence_runs():
    """One packed forward holding a decode token, two prefills of other lengths and a continuation,
    in non-contiguous slots, against transformers run on each sequence separately."""
    config, ref, mine = make_pair(seed=2)
    torch.manual_seed(3)
    hist_lens = [9, 0, 5, 0]  # tokens already in each sequence's state
    new_lens = [1, 11, 3, 2]
    slots = [3, 0, 5, 1]
    xs = [torch.randn(1, h + n, 64) for h, n in zip(hist_lens, new_lens)]
    cache = GatedDeltaCache([mine], batch_size=6)
    cache.mamba(0)[0].normal_()  # garbage in the slots: fresh sequences must not read it
    cache.mamba(0)[1].normal_()
    # histories, through the layer one sequence at a time
    for i, h in enumerate(hist_lens):
        if h:
            mine(xs[i][0, :h], Batch([h], [0], [slots[i]]), cache)
    packed = torch.cat([xs[i][0, h:] for i, h in enumerate(hist_lens)])
    got = mine(packed, Batch(new_lens, hist_lens, slots), cache)
    offs = [0]
    for n in new_lens:
        offs.append(offs[-1] + n)
    for i, h in enumerate(hist_lens):
        hc = hf_cache(config)
        if h:
            ref(xs[i][:, :h], cache_params=hc)
        want = ref(xs[i][:, h:], cache_params=hc)[0]
        torch.testing.assert_close(got[offs[i]: offs[i + 1]], want, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(cache.mamba(0)[1][slots[i]], hc.layers[0].recurrent_states[0][0],
                                   atol=ATOL, rtol=1e-4)


def test_packed_conv_matches_dense_conv():
    torch.manual_seed(4)
    C, W = 6, 4
    weight = torch.randn(C, W)
    lens, starts = [5, 1, 0, 2], [0, 5, 6, 6]
    x = torch.randn(8, C)
    st = torch.randn(4, C, W - 1)
    y, new = packed_causal_conv1d(x, weight, None, st, starts, lens)
    for i, (s, n) in enumerate(zip(starts, lens)):
        full = torch.cat([st[i], x[s: s + n].T], 1)  # [C, W-1+n]
        if n:
            want = torch.nn.functional.conv1d(full[None], weight[:, None], groups=C)[0].T  # [n, C]
            torch.testing.assert_close(y[s: s + n], want)
        torch.testing.assert_close(new[i], full[:, -(W - 1):])


def test_config_from_hf_and_state_shapes():
    config, _, mine = make_pair()
    c = GatedDeltaNetConfig.from_hf(config)
    assert (c.num_k_heads, c.num_v_heads, c.head_k_dim, c.head_v_dim, c.conv_kernel) == (2, 4, 16, 16, 4)
    assert mine.state_shapes() == ((2 * 32 + 64, 3), (4, 16, 16))


@torch.no_grad()
def test_bf16_prefill_and_decode_close_to_transformers():
    config, ref, mine = make_pair(seed=5)
    ref, mine = ref.to(torch.bfloat16), mine.to(torch.bfloat16)
    x = torch.randn(1, 12, 64).to(torch.bfloat16)
    cache = hf_cache(config)
    mine_cache = GatedDeltaCache([mine], batch_size=1, dtype=torch.bfloat16)
    want = ref(x[:, :11], cache_params=cache).float()
    got = mine(x[0, :11], Batch.uniform(1, 11), mine_cache).float()
    assert (got - want[0]).abs().max() <= 3e-2 * want.abs().max()
    want = ref(x[:, 11:], cache_params=cache).float()
    got = mine(x[0, 11:], Batch.uniform(1, 1, context_len=11), mine_cache).float()
    assert (got - want[0]).abs().max() <= 3e-2 * want.abs().max()
    assert mine_cache.mamba(0)[1].dtype == torch.float32
