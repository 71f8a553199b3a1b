"""MTP speculative decoding: identical greedy output, exact state rollback, target distribution kept."""

import math

import pytest
import torch

from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.sampling_params import SamplingParams

from engine_models import TINY, make_agreeable, random_prompts, run_staggered, tiny_model

MTP = TINY.replace(num_nextn_predict_layers=1, mtp_pattern="*E")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, config=MTP)


@pytest.fixture(scope="module")
def agreeable():
    """A model whose MTP head often agrees with it (see engine_models.make_agreeable)."""
    return make_agreeable(tiny_model(seed=2, config=MTP))


def run(model, prompts, params, k, join_every=1, **cfg):
    return run_staggered(model, prompts, params, join_every, speculative_tokens=k, **cfg)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["model", "agreeable"])
def test_greedy_identical_with_speculation(request, which, k):
    m = request.getfixturevalue(which)
    prompts = random_prompts(5, 2, 30, seed=k)
    params = SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)
    plain, _ = run(m, prompts, params, 0)
    for cfg in (dict(), dict(max_num_batched_tokens=7, max_num_seqs=3)):  # chunked prefill, batches mixing phases
        spec, metrics = run(m, prompts, params, k, join_every=2, **cfg)
        assert spec == plain
        assert metrics.spec_steps > 0
    if which == "agreeable":
        assert metrics.spec_acceptance_rate > 0.3


def test_speculating_and_plain_requests_share_a_batch(agreeable):
    prompts = random_prompts(4, 5, 20, seed=9)
    mixed = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),  # not speculated
             SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[7]),
             SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)]
    plain, _ = run(agreeable, prompts, mixed, 0)
    spec, metrics = run(agreeable, prompts, mixed, 3)
    assert spec == plain and metrics.spec_accepted_tokens > 0
    assert len(spec[3]) == 5  # max_tokens holds although drafts could run past it


def test_rollback_restores_exact_state(model):
    """After every step (rejections included), each Mamba state and the KV of the computed positions
    equal what a plain forward over the same tokens leaves behind."""
    eng = LLMEngine(model, EngineConfig(speculative_tokens=3, block_size=4))
    prompt = random_prompts(1, 9, 9, seed=4)[0]
    eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    rejected = 0
    while eng.has_unfinished():
        before = eng.metrics.spec_draft_tokens - eng.metrics.spec_accepted_tokens
        eng.step()
        if not eng.has_unfinished():
            break
        r = next(iter(eng.requests.values()))
        rejected += (eng.metrics.spec_draft_tokens - eng.metrics.spec_accepted_tokens) > before
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.tensor([r.token_ids[: r.num_computed]]), cache=cache)
        for layer in eng.pool.conv:
            conv, ssm = cache.mamba(layer)
            assert torch.allclose(eng.pool.conv[layer][r.slot], conv[0], atol=1e-5)
            assert torch.allclose(eng.pool.ssm[layer][r.slot], ssm[0], atol=1e-5, rtol=1e-4)
        for layer in model.config.layer_indices("*"):
            k_ref = cache._kv[layer][0][0, : r.num_computed]
            table = eng.pool.block_tables[r.slot]
            rows = (torch.tensor(table)[:, None] * eng.pool.block_size + torch.arange(eng.pool.block_size)).view(-1)
            flat = eng.pool.k[layer][:, rows].transpose(0, 1)[: r.num_computed]  # [positions, Hkv, hd]
            assert torch.allclose(flat, k_ref, atol=1e-5)
    assert rejected > 0


@pytest.mark.parametrize("drafts", ["sampled", "native argmax"])
def test_sampled_output_keeps_the_target_distribution(agreeable, monkeypatch, drafts):
    """Second-token frequencies with speculation (K=2) against the exact target marginal
    sum_a p(a | prompt) p(b | prompt, a): chi-square at significance 0.001. Drafts sampled from the MTP's
    distribution q (grouped routing: the step-by-step path), or its argmax from the native draft loop, a point mass
    q (ungrouped routing: hylm/ops/mtp_draft.py)."""
    import copy

    if drafts == "sampled":
        m = copy.deepcopy(agreeable)
    else:
        m = make_agreeable(tiny_model(seed=2, config=MTP.replace(n_group=1, topk_group=1)))
        from hylm.ops import mtp_draft

        native_calls = []
        kernel = mtp_draft.mtp_greedy
        monkeypatch.setattr("hylm.model.mtp.mtp_greedy", lambda *a, **k: native_calls.append(1) or kernel(*a, **k))
    with torch.no_grad():  # milder pull toward token 7: a spread-out distribution that drafts still hit often
        m.lm_head.weight[7, 0] = 3.6
    prompt = [5, 9, 14, 3]
    params = lambda seed: SamplingParams(temperature=1.0, top_k=6, max_tokens=3, ignore_eos=True, seed=seed)
    n = 2000
    # the 3rd token leaves room for 1 draft
    eng = LLMEngine(m, EngineConfig(speculative_tokens=2, max_num_seqs=16, max_model_len=16))
    for seed in range(n):
        eng.add_request(prompt, params(seed))
    counts: dict[int, int] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                counts[o.output_ids[1]] = counts.get(o.output_ids[1], 0) + 1
    assert eng.metrics.spec_accepted_tokens > 100  # drafts were accepted often enough to matter
    assert drafts == "sampled" or len(native_calls) > 50
    from hylm.engine.speculative import distribution

    with torch.no_grad():
        p1 = distribution(m(torch.tensor([prompt]))[0, -1:], params(0))[0]
        support = p1.nonzero().flatten().tolist()
        seqs = torch.tensor([prompt + [a] for a in support])
        p2 = distribution(m(seqs)[:, -1], params(0))  # [len(support), V]
        expected = (p1[support].unsqueeze(1) * p2).sum(0) * n  # [V]
    # cells expected fewer than 5 times are pooled into one "other" cell, as a chi-square test requires
    keep = expected > 5
    observed = [counts.get(b, 0) for b in keep.nonzero().flatten().tolist()]
    wanted = [float(e) for e in expected[keep]]
    observed.append(n - sum(observed))
    wanted.append(n - sum(wanted))
    if wanted[-1] <= 5:  # too rare to test on its own: fold into the smallest kept cell
        smallest = min(range(len(wanted) - 1), key=wanted.__getitem__)
        observed[smallest] += observed.pop()
        wanted[smallest] += wanted.pop()
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, wanted))
    df = len(wanted) - 1
    # chi-square critical value at 0.001 (Wilson-Hilferty approximation)
    z = 3.0902
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < crit, (chi2, crit, df, observed, wanted)


def test_no_mtp_block_is_a_clear_error():
    with pytest.raises(ValueError, match="no MTP block"):
        LLMEngine(tiny_model(), EngineConfig(speculative_tokens=2))
