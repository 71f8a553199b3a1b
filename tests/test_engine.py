"""Engine: batch invariance, parity with the full forward, seeds, no leaks, preemption."""

import random

import pytest
import torch

from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.llm import LLM
from hylm.engine.sampling_params import SamplingParams
from hylm.engine.scheduler import RequestTooLong
from hylm.ops import native

from engine_models import TINY, assert_runs_agree, random_prompts, tiny_model
from engine_models import run_staggered as staggered


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run_alone(model, prompt, params, **cfg):
    eng = LLMEngine(model, EngineConfig(**cfg))
    rid = eng.add_request(prompt, params)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out = o
    return out.output_ids


def run_staggered(model, prompts, params, join_every=2, **cfg):
    return staggered(model, prompts, params, join_every, **cfg)[0]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_greedy_engine_matches_model_loop(model):
    """The engine's greedy output equals a plain argmax loop over the model's full-sequence forward."""
    prompt = random_prompts(1, 21, 21, seed=5)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert run_alone(model, prompt, GREEDY) == seq[len(prompt):]


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 13, 64])
def test_batch_invariance_with_chunked_prefill(model, chunk):
    prompts = random_prompts(6, 2, 40, seed=chunk)
    alone = [run_alone(model, p, GREEDY) for p in prompts]
    together = run_staggered(model, prompts, GREEDY, join_every=2, max_num_batched_tokens=chunk + 6)
    assert together == alone


def test_all_at_once_and_tiny_budget(model):
    prompts = random_prompts(8, 1, 30, seed=11)
    alone = [run_alone(model, p, GREEDY) for p in prompts]
    assert run_staggered(model, prompts, GREEDY, join_every=1, max_num_batched_tokens=7, max_num_seqs=3) == alone


def test_engine_logprobs_equal_full_forward(model):
    """Prefill + decode through the engine (paged KV, slots, chunked prefill) reproduce the full forward's
    log-probabilities of every generated token to 1e-4, and its top-5 alternatives."""
    prompts = random_prompts(3, 9, 30, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5)
    llm = LLM(model, max_num_batched_tokens=11, block_size=4)
    for prompt, comp in zip(prompts, llm.generate(prompts, params)):
        out = comp.outputs[0]
        full = prompt + out.token_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([full]))[0].double(), -1)
        for j, tok in enumerate(out.token_ids):
            row = ref[len(prompt) - 1 + j]
            assert abs(out.logprobs[j] - row[tok].item()) < 1e-4
            top_ids = [t for t, _ in out.top_logprobs[j]]
            assert top_ids == row.topk(5).indices.tolist()
            for t, lp in out.top_logprobs[j]:
                assert abs(lp - row[t].item()) < 1e-4


def test_seeds(model):
    prompts = random_prompts(4, 5, 20, seed=7)
    sp = lambda seed: SamplingParams(temperature=1.0, top_p=0.9, max_tokens=15, seed=seed, ignore_eos=True)
    alone = [run_alone(model, p, sp(100 + i)) for i, p in enumerate(prompts)]
    again = run_staggered(model, prompts, [sp(100 + i) for i in range(4)], join_every=1, max_num_batched_tokens=9)
    assert again == alone
    other = [run_alone(model, p, sp(200 + i)) for i, p in enumerate(prompts)]
    assert sum(a != b for a, b in zip(alone, other)) >= 3


def test_no_leaks_after_random_aborts(model):
    rng = random.Random(0)
    eng = LLMEngine(model, EngineConfig(max_num_seqs=6, block_size=4, max_num_batched_tokens=32, max_model_len=96,
                                        memory_bytes=None))
    prompts = random_prompts(200, 1, 40, seed=1)
    live, finished, aborted, i = set(), 0, 0, 0
    while i < len(prompts) or eng.has_unfinished():
        while i < len(prompts) and len(live) < 12:
            p = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 20), seed=i)
            live.add(eng.add_request(prompts[i], p))
            i += 1
        for o in eng.step():
            if o.finished:
                live.discard(o.request_id)
                finished += 1
        if live and rng.random() < 0.3:
            rid = rng.choice(sorted(live))
            assert eng.abort(rid)
            live.discard(rid)
            aborted += 1
    assert finished + aborted == 200 and aborted > 20
    assert eng.pool.num_free_slots == eng.sizes.num_slots
    assert eng.pool.num_free_blocks == eng.sizes.num_blocks
    assert not eng.pool.block_tables and not eng.scheduler.running and not eng.scheduler.waiting
    assert eng.metrics.slots_used == 0 and eng.metrics.blocks_used == 0


def test_preemption_keeps_outputs(model):
    prompts = random_prompts(6, 10, 30, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)
    alone = [run_alone(model, p, params) for p in prompts]
    # 14 blocks of 4 tokens: far less than 6 requests of up to 55 tokens need at once
    cfg = dict(max_num_seqs=6, block_size=4, max_num_batched_tokens=16, max_model_len=56,
               memory_bytes=None)
    eng_probe = LLMEngine(model, EngineConfig(**cfg))
    budget = eng_probe.sizes.slot_bytes * 6 + eng_probe.sizes.block_bytes * 14
    cfg["memory_bytes"] = budget
    eng = LLMEngine(model, EngineConfig(**cfg))
    assert eng.sizes.num_blocks == 14
    ids = {eng.add_request(p, params): i for i, p in enumerate(prompts)}
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[ids[o.request_id]] = o.output_ids
    assert eng.metrics.preemptions > 0
    assert [outs[i] for i in range(6)] == alone
    assert eng.pool.num_free_blocks == 14


def test_requests_that_can_never_fit_are_refused(model):
    eng = LLMEngine(model, EngineConfig(max_model_len=32))
    with pytest.raises(RequestTooLong, match="exceeds the maximum model length of 32"):
        eng.add_request(list(range(3, 30)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request([5, 999999], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="stop_token_ids out of range"):
        eng.add_request([5], SamplingParams(stop_token_ids=[10**6], min_tokens=2))
    assert eng.pool.num_free_slots == eng.sizes.num_slots and not eng.has_unfinished()


def test_stop_token_and_max_tokens(model):
    prompt = random_prompts(1, 12, 12, seed=2)[0]
    free = run_alone(model, prompt, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    stop_at = free[4]
    first = free.index(stop_at)
    out = run_alone(model, prompt, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]))
    assert out == free[: first + 1]


def test_stream_close_aborts(model):
    llm = LLM(model, max_num_seqs=2)
    it = llm.stream([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert llm.engine.pool.num_free_slots == 2 and not llm.engine.has_unfinished()


def _logprob_run(model, prompts, **cfg):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    llm = LLM(model, block_size=4, **cfg)
    return [(c.outputs[0].token_ids, c.outputs[0].logprobs) for c in llm.generate(prompts, params)]


def test_narrow_kv_cache_dtype(model):
    """--kv-cache-dtype bf16 on an fp32 model: the KV blocks hold bf16 (half the bytes), outputs stay within
    bf16 rounding of the fp32 cache's, and chunking the prefill changes nothing beyond fp32 rounding (every
    path attends to what the cache holds)."""
    prompts = random_prompts(3, 9, 30, seed=21)
    wide = LLMEngine(model, EngineConfig(max_num_seqs=2, max_model_len=64))
    narrow = LLMEngine(model, EngineConfig(max_num_seqs=2, max_model_len=64, kv_cache_dtype="bf16"))
    assert narrow.pool.k[2].dtype == torch.bfloat16 and narrow.pool.conv[0].dtype == torch.float32
    assert narrow.sizes.block_bytes * 2 == wide.sizes.block_bytes
    ref = _logprob_run(model, prompts)
    one_chunk = _logprob_run(model, prompts, kv_cache_dtype=torch.bfloat16, max_num_batched_tokens=64)
    small_chunks = _logprob_run(model, prompts, kv_cache_dtype="bf16", max_num_batched_tokens=5)
    for (t_ref, lp_ref), (t1, lp1), (t2, lp2) in zip(ref, one_chunk, small_chunks):
        assert t1 == t2
        # chunks of 5 and of 64 rows run their products on different kernels: k and v differ by fp32 rounding,
        # which now and then lands a value on the other side of a bf16 rounding boundary in the cache
        assert max(abs(a - b) for a, b in zip(lp1, lp2)) < 1e-3
        n = next((j for j, (a, b) in enumerate(zip(t_ref, t1)) if a != b), len(t1))
        assert n > 0 and max(abs(a - b) for a, b in zip(lp_ref[:n], lp1[:n])) < 0.05
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(model, EngineConfig(kv_cache_dtype="int8"))


def test_batched_decode_attention_equals_per_sequence_windows(model, monkeypatch):
    """Decode steps of several sequences attend in one padded, masked call; greedy outputs equal the
    per-sequence window path's, with sequences of different lengths joining at different steps."""
    import hylm.model.attention as attention

    prompts = random_prompts(5, 3, 40, seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    monkeypatch.setattr(attention, "native_decode_enabled", False)  # the PyTorch paths, compared here
    calls = []
    original = attention.Attention._decode_batched
    monkeypatch.setattr(attention.Attention, "_decode_batched",
                        lambda self, *a: calls.append(1) or original(self, *a))
    batched, _ = staggered(model, prompts, params, 2, max_num_batched_tokens=16, block_size=4)
    assert calls
    monkeypatch.setattr(attention, "BATCHED_DECODE_MAX", 0)
    calls.clear()
    windows, _ = staggered(model, prompts, params, 2, max_num_batched_tokens=16, block_size=4)
    assert not calls
    assert batched == windows


@pytest.mark.skipif(not native.available(), reason="no C compiler: the native CPU kernels are not built")
@pytest.mark.parametrize("kv_cache_dtype", [None, "bf16"])
def test_native_paged_decode_equals_pytorch_paths(model, monkeypatch, kv_cache_dtype):
    """Decode tokens, and short continuation chunks (several new tokens per sequence over a short context),
    attend through the native paged kernel (one call per layer for the whole batch, the cache read in place
    through block tables); greedy tokens and logprobs equal the PyTorch paths', with sequences of different
    lengths joining at different steps, block size 4, an fp32 or a bf16 cache."""
    import hylm.model.attention as attention
    from hylm.engine.state_pool import StatePool
    from hylm.model import fused
    from hylm.ops import paged_attention

    monkeypatch.setattr(fused, "enabled", False)  # the paged kernel as the attention layer calls it (not in a block)

    new_tokens = []
    original_paged = StatePool.kv_paged
    monkeypatch.setattr(StatePool, "kv_paged",
                        lambda self, layer, batch, *a: new_tokens.append(max(batch.seq_lens))
                        or original_paged(self, layer, batch, *a))

    prompts = random_prompts(5, 3, 40, seed=32)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    cfg = dict(max_num_batched_tokens=16, block_size=4, kv_cache_dtype=kv_cache_dtype)
    calls = []
    original = paged_attention._native
    monkeypatch.setattr(paged_attention, "_native", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    native_out, _ = staggered(model, prompts, params, 2, **cfg)
    native_lp = _logprob_run(model, prompts, kv_cache_dtype=kv_cache_dtype)
    assert calls and max(calls) >= 2  # batches of decoding sequences went through the kernel
    assert 1 in new_tokens and max(new_tokens) > 1  # decode steps and multi-token chunks
    monkeypatch.setattr(attention, "native_decode_enabled", False)
    calls.clear()
    torch_out, _ = staggered(model, prompts, params, 2, **cfg)
    torch_lp = _logprob_run(model, prompts, kv_cache_dtype=kv_cache_dtype)
    assert not calls
    assert native_out == torch_out
    assert_runs_agree(native_lp, torch_lp)


def test_pool_block_tables_grow_inside_and_outside_inference_mode():
    """The pool's per-slot block-table tensors, first built during an engine step (inference mode), keep growing
    when the pool is read outside it (a caller driving the model by hand)."""
    from hylm.model import Batch

    eng = LLMEngine(tiny_model(0), EngineConfig(max_num_seqs=1, max_model_len=64, block_size=4))
    eng.add_request(list(range(3, 12)), SamplingParams(max_tokens=4))
    eng.step()
    r, pool = eng.scheduler.running[0], eng.pool
    assert pool.reserve(r.slot, r.num_computed + 8)
    layer = TINY.pattern.index("*")
    tables = pool.kv_paged_layout(layer, Batch([5], [r.num_computed], [r.slot]))[2]  # [5, blocks]
    assert tables[0].tolist() == pool.block_tables[r.slot][: tables.shape[1]]
