"""Prefix caching: identical greedy outputs, only new tokens prefilled, no leaks, budget respected."""

import pytest

from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.sampling_params import SamplingParams

from engine_models import random_prompts, tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine(model, caching, **kw):
    cfg = dict(max_num_seqs=4, block_size=8, max_model_len=1024, max_num_batched_tokens=48,
               enable_prefix_caching=caching, prefix_cache_interval_blocks=2)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg))


def run(eng, prompts, params=GREEDY):
    ids = {eng.add_request(p, params): i for i, p in enumerate(prompts)}
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[ids[o.request_id]] = o.output_ids
    return [outs[i] for i in range(len(prompts))]


def assert_no_leaks(eng):
    if eng.prefix_cache is not None:
        assert eng.prefix_cache.stats.bytes_used <= eng.prefix_cache.budget
        eng.prefix_cache.clear()
        assert eng.prefix_cache.stats.bytes_used == 0
    assert eng.pool.num_free_blocks == eng.sizes.num_blocks and eng.pool.num_free_slots == eng.sizes.num_slots
    assert all(r == 0 for r in eng.pool.refs)


def test_ten_turn_conversation_prefills_only_new_tokens(model):
    users = random_prompts(10, 5, 30, seed=21)
    plain, cached = engine(model, False), engine(model, True)
    history_plain = history_cached = []
    for turn, user in enumerate(users):
        prompt = history_cached + user
        before = cached.metrics.prefill_tokens
        out_cached = run(cached, [prompt])[0]
        computed = cached.metrics.prefill_tokens - before
        out_plain = run(plain, [history_plain + user])[0]
        assert out_cached == out_plain
        if turn == 0:
            assert computed == len(prompt)
        else:  # the new user tokens, plus the last token of the previous answer (never fed to the model)
            assert computed == len(user) + 1, (turn, computed, len(user))
        history_cached = history_plain = prompt + out_cached
    st = cached.prefix_cache.stats
    assert st.hits == 9 and st.tokens_reused > 0
    assert_no_leaks(cached)


def test_shared_system_prompt_and_concurrent_sharers(model):
    system = random_prompts(1, 70, 70, seed=5)[0]
    users = random_prompts(6, 3, 12, seed=6)
    prompts = [system + u for u in users]
    ref = run(engine(model, False), prompts)
    eng = engine(model, True)
    assert run(eng, prompts[:1]) == ref[:1]
    reused = eng.prefix_cache.stats.tokens_reused
    assert run(eng, prompts[1:]) == ref[1:]  # five requests at once, all resuming from the cached system prompt
    st = eng.prefix_cache.stats
    assert st.hits == 5
    assert st.tokens_reused - reused == 5 * 64  # checkpoints every 2 blocks of 8: the system prompt up to 64
    assert_no_leaks(eng)


def test_outputs_unchanged_after_evictions(model):
    prompts = random_prompts(12, 20, 60, seed=8)
    ref = run(engine(model, False), prompts)
    eng = engine(model, True)
    eng.prefix_cache.budget = 3 * eng.sizes.slot_bytes  # room for three checkpoints
    for i, p in enumerate(prompts):
        assert run(eng, [p]) == [ref[i]]
        assert eng.prefix_cache.stats.bytes_used <= eng.prefix_cache.budget
    # revisit: early prompts' checkpoints are gone, outputs still the same
    again = [p + ref[i] + [7, 8, 9] for i, p in enumerate(prompts[:4])]
    ref_again = run(engine(model, False), again)
    assert run(eng, again) == ref_again
    st = eng.prefix_cache.stats
    assert st.evictions > 0 and st.misses["evicted"] > 0
    assert_no_leaks(eng)


def test_checkpoints_give_way_to_running_requests(model):
    """With few KV blocks, cached prefixes are evicted before any running request is preempted."""
    probe = engine(model, True)
    budget = probe.sizes.slot_bytes * 4 + probe.sizes.block_bytes * 40
    prompts = random_prompts(8, 30, 50, seed=12)
    ref = run(engine(model, False), prompts)
    eng = engine(model, True, memory_bytes=budget, max_model_len=320)
    eng.prefix_cache.budget = 100 * eng.sizes.slot_bytes
    for i, p in enumerate(prompts):
        assert run(eng, [p]) == [ref[i]]
    assert eng.prefix_cache.stats.evictions > 0 and eng.metrics.preemptions == 0
    assert_no_leaks(eng)


def test_aborts_and_random_traffic_leave_nothing_behind(model):
    import random

    rng = random.Random(3)
    eng = engine(model, True)
    base = random_prompts(3, 20, 40, seed=30)
    live = set()
    for i in range(60):
        p = rng.choice(base) + random_prompts(1, 1, 10, seed=100 + i)[0]
        live.add(eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 8))))
        for o in eng.step():
            if o.finished:
                live.discard(o.request_id)
        if live and rng.random() < 0.3:
            rid = rng.choice(sorted(live))
            eng.abort(rid)
            live.discard(rid)
    while eng.has_unfinished():
        eng.step()
    assert eng.prefix_cache.stats.hits > 0
    assert_no_leaks(eng)
