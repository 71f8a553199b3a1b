"""Tests for SamplingParams and the batched sampler, against hand-computed references."""

import math
from collections import Counter

import pytest
import torch

from hylm.engine.sampler import Sampler, SamplerOutput
from hylm.engine.sampling_params import SamplingParams

N_DRAWS = 20_000
TOL = 0.015  # max abs error of an empirical frequency over N_DRAWS (> 4 sigma)


def run(logits, params, prompts=None, outputs=None, gens=None):
    """Sample one step; logits is [B, V] (or [V] for one row), params one or a list."""
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    B = logits.shape[0]
    params = params if isinstance(params, list) else [params] * B
    prompts = prompts if prompts is not None else [[] for _ in range(B)]
    outputs = outputs if outputs is not None else [[] for _ in range(B)]
    gens = gens if gens is not None else [None] * B
    return Sampler().sample(logits, params, prompts, outputs, gens)


def draw_many(logits_row, params, seed=0, n=N_DRAWS):
    """n draws from one row's distribution: n identical rows sharing one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    out = run(logits, params, gens=[g] * n)
    return out.token_ids


def empirical(tokens, V):
    c = Counter(tokens)
    return [c.get(t, 0) / len(tokens) for t in range(V)]


def check_distribution(tokens, target):
    """target: dict token -> probability (sums to 1); support must match exactly."""
    V = max(max(tokens), max(target)) + 1
    assert set(tokens) == set(target), f"support {sorted(set(tokens))} != {sorted(target)}"
    emp = empirical(tokens, V)
    err = max(abs(emp[t] - target.get(t, 0.0)) for t in range(V))
    assert err < TOL, f"max abs error {err:.4f}: {emp} vs {target}"


# a distribution with clear gaps, as logits = log(p)
P7 = [0.35, 0.25, 0.15, 0.10, 0.08, 0.05, 0.02]
L7 = torch.tensor([math.log(p) for p in P7], dtype=torch.float32)


def renorm(probs: dict) -> dict:
    s = sum(probs.values())
    return {t: v / s for t, v in probs.items()}


# ---------------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------------

def test_params_defaults():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 16, 0, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos
    assert p.logprobs is None and p.skip_special_tokens
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=-1).greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    # default lists are not shared
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5),
    ("max_tokens", 0), ("max_tokens", -3),
    ("min_tokens", -1),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("seed", 1.5), ("seed", "7"),
    ("stop", [""]), ("stop", [1]), ("stop", ["s"] * 17),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]),
    ("logprobs", -1), ("logprobs", 21),
])
def test_params_validate_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_min_tokens_vs_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    SamplingParams(min_tokens=4, max_tokens=4)
    SamplingParams(min_tokens=1000, max_tokens=None)


def test_params_validate_after_mutation():
    p = SamplingParams()
    p.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        p.validate()


def test_params_edges_and_normalisation():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   logprobs=0, stop=["a"] * 16, stop_token_ids=[0, 5])
    SamplingParams(logprobs=20, temperature=250.0)
    assert SamplingParams(seed=-1).seed == 2**64 - 1
    assert SamplingParams(seed=2**64 + 5).seed == 5
    assert SamplingParams(seed=123).seed == 123
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]
    torch.Generator().manual_seed(SamplingParams(seed=-(2**70)).seed)  # always a valid torch seed


# ---------------------------------------------------------------------------------------------------
# greedy and penalties
# ---------------------------------------------------------------------------------------------------

def test_greedy_is_argmax_and_consumes_no_randomness():
    g0 = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g0)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    states = [g.get_state().clone() for g in gens]
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=0.7)] * 3
    out = run(logits, params, gens=gens)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6
    for g, s in zip(gens, states):
        assert torch.equal(g.get_state(), s)


def test_greedy_ties_take_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    assert run(logits, SamplingParams(temperature=0)).token_ids == [1]


# V = 6 logits, prompt = [0, 1], output = [2, 2, 3]
PEN_LOGITS = [2.0, -1.0, 0.5, -0.5, 1.0, 0.0]
PEN_PROMPT = [0, 1]
PEN_OUTPUT = [2, 2, 3]


@pytest.mark.parametrize("kw,expected", [
    # repetition 2 over prompt + output {0, 1, 2, 3}: positive / 2, negative * 2
    (dict(repetition_penalty=2.0), [1.0, -2.0, 0.25, -1.0, 1.0, 0.0]),
    # repetition 0.5 (encourages): positive / 0.5, negative * 0.5
    (dict(repetition_penalty=0.5), [4.0, -0.5, 1.0, -0.25, 1.0, 0.0]),
    # presence 0.5 over output {2, 3} only (prompt tokens 0, 1 untouched)
    (dict(presence_penalty=0.5), [2.0, -1.0, 0.0, -1.0, 1.0, 0.0]),
    # frequency 0.25 * counts (2: x2, 3: x1)
    (dict(frequency_penalty=0.25), [2.0, -1.0, 0.0, -0.75, 1.0, 0.0]),
    # negative presence/frequency raise logits
    (dict(presence_penalty=-1.0, frequency_penalty=-0.5), [2.0, -1.0, 2.5, 1.0, 1.0, 0.0]),
    # all: repetition first, then presence + frequency
    #   0: 2/2 = 1;  1: -1*2 = -2;  2: 0.5/2 - 0.5 - 2*0.25 = -0.75;  3: -0.5*2 - 0.5 - 0.25 = -1.75
    (dict(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
     [1.0, -2.0, -0.75, -1.75, 1.0, 0.0]),
])
def test_penalties_hand_table(kw, expected):
    logits = torch.tensor([PEN_LOGITS])
    p = SamplingParams(temperature=0, **kw)
    got = Sampler().apply_penalties(logits, [p], [PEN_PROMPT], [PEN_OUTPUT])
    assert got.tolist() == [expected]
    assert logits.tolist() == [PEN_LOGITS]  # input untouched
    # greedy sampling picks the argmax after penalties (ties: lowest id)
    exp_tok = max(range(6), key=lambda t: (expected[t], -t))
    assert run(logits, p, [PEN_PROMPT], [PEN_OUTPUT]).token_ids == [exp_tok]


def test_penalties_flip_greedy_choice_and_only_touch_their_rows():
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0),
              SamplingParams(temperature=0, repetition_penalty=1.2),
              SamplingParams(temperature=0, frequency_penalty=0.1)]
    # row 0: no penalties -> 0; row 1: 3/1.2 = 2.5 < 2.9 -> 1; row 2: 3 - 0.1*2 = 2.8 < 2.9 -> 1
    out = run(logits, params, prompts=[[0], [0], [1]], outputs=[[0], [0], [0, 0]])
    assert out.token_ids == [0, 1, 1]
    pen = Sampler().apply_penalties(logits, params, [[0], [0], [1]], [[0], [0], [0, 0]])
    assert pen[0].equal(logits[0])  # the row without penalties is untouched


def test_penalties_leave_neg_inf_alone():
    logits = torch.tensor([[float("-inf"), 1.0, 0.5]])
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0)
    got = Sampler().apply_penalties(logits, [p], [[0, 1]], [[0, 2]])
    assert got[0, 0].item() == float("-inf")
    assert torch.isfinite(got[0, 1:]).all()


# ---------------------------------------------------------------------------------------------------
# distributions: temperature, top-k, top-p, min-p
# ---------------------------------------------------------------------------------------------------

def softmax_ref(logits, T=1.0):
    m = max(logits)
    e = [math.exp((v - m) / T) for v in logits]
    s = sum(e)
    return [v / s for v in e]


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
def test_temperature_matches_softmax(T):
    logits = [1.0, 0.2, -0.5, 0.7, -2.0]
    toks = draw_many(torch.tensor(logits), SamplingParams(temperature=T), seed=int(T * 10))
    ref = softmax_ref(logits, T)
    check_distribution(toks, {t: p for t, p in enumerate(ref)})


@pytest.mark.parametrize("kw,target", [
    # top-k 3: {0, 1, 2}
    (dict(top_k=3), renorm({0: .35, 1: .25, 2: .15})),
    # top-k >= V and -1 are no-ops
    (dict(top_k=50), dict(enumerate(P7))),
    (dict(top_k=-1), dict(enumerate(P7))),
    # top-p 0.8: cumulative .35 .60 .75 .85 -> first to reach 0.8 is token 3
    (dict(top_p=0.8), renorm({0: .35, 1: .25, 2: .15, 3: .10})),
    # tiny top-p keeps exactly the most probable token
    (dict(top_p=0.01), {0: 1.0}),
    # min-p 0.25: threshold .0875 -> drops .08, .05, .02
    (dict(min_p=0.25), renorm({0: .35, 1: .25, 2: .15, 3: .10})),
    # top-k 4 then top-p 0.7 on the renormalised top-4 (.412 .706 ...) -> {0, 1}
    (dict(top_k=4, top_p=0.7), renorm({0: .35, 1: .25})),
    # top-p 0.95 (cum .35 .6 .75 .85 .93 .98) then min-p 0.5 (threshold .175) -> {0, 1}
    (dict(top_p=0.95, min_p=0.5), renorm({0: .35, 1: .25})),
])
def test_filters_support_and_distribution(kw, target):
    toks = draw_many(L7, SamplingParams(**kw), seed=sum(map(ord, repr(kw))))
    check_distribution(toks, target)


def test_filters_after_temperature():
    # T = 2: probs proportional to sqrt(P7); min_p = 0.5 keeps those with sqrt(p) >= 0.5 * sqrt(.35)
    sq = {t: math.sqrt(p) for t, p in enumerate(P7)}
    keep = {t: v for t, v in sq.items() if v >= 0.5 * sq[0]}
    assert sorted(keep) == [0, 1, 2, 3]  # hand check: .592 .5 .387 .316 vs threshold .296
    toks = draw_many(L7, SamplingParams(temperature=2.0, min_p=0.5), seed=11)
    check_distribution(toks, renorm(keep))
    # T = 0.5: probs proportional to p^2 (sum .2265); top-p 0.8 -> cum .541 .817 -> {0, 1}
    toks = draw_many(L7, SamplingParams(temperature=0.5, top_p=0.8), seed=12)
    check_distribution(toks, renorm({0: .35 ** 2, 1: .25 ** 2}))


def test_penalties_then_sampling_distribution():
    # frequency penalty log(2) on token 0 seen once halves its weight
    logits = torch.tensor([0.0, 0.0, 0.0])
    p = SamplingParams(frequency_penalty=math.log(2.0))
    g = torch.Generator().manual_seed(5)
    n = N_DRAWS
    out = run(logits.expand(n, -1).contiguous(), p, outputs=[[0]] * n, gens=[g] * n)
    check_distribution(out.token_ids, {0: 0.2, 1: 0.4, 2: 0.4})


def test_never_samples_masked_tokens():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf"), 0.5])
    for kw in (dict(), dict(top_p=0.999), dict(top_k=4), dict(min_p=0.01)):
        toks = draw_many(logits, SamplingParams(**kw), seed=3, n=3000)
        assert set(toks) <= {0, 2, 4}


# ---------------------------------------------------------------------------------------------------
# seeds and batch invariance
# ---------------------------------------------------------------------------------------------------

def generate(seed, params, steps=12, V=1000, logit_seed=0):
    """A seeded request over several steps with fixed per-step logits."""
    lg = torch.Generator().manual_seed(logit_seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(1, V, generator=lg) * 0.5
        out += run(logits, params, [[1, 2, 3]], [list(out)], [g]).token_ids
    return out


def test_same_seed_same_tokens_different_seed_differs():
    p = SamplingParams(top_p=0.95, repetition_penalty=1.1)
    a, b, c = generate(7, p), generate(7, p), generate(8, p)
    assert a == b
    assert a != c


def test_generator_advances_the_same_whatever_the_filters():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    states = []
    for p in (SamplingParams(), SamplingParams(top_k=5), SamplingParams(top_p=0.5, min_p=0.1, temperature=0.3),
              SamplingParams(presence_penalty=1.0)):
        g = torch.Generator().manual_seed(42)
        run(logits, p, [[1]], [[2]], [g])
        states.append(g.get_state())
    assert all(torch.equal(s, states[0]) for s in states)


def test_unseeded_rows_use_default_rng():
    logits = torch.zeros(1, 1000)
    torch.manual_seed(123)
    a = run(logits, SamplingParams()).token_ids
    torch.manual_seed(123)
    b = run(logits, SamplingParams()).token_ids
    assert a == b


BATCH_PARAMS = [
    SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=2),
    SamplingParams(temperature=0.8, top_k=20, presence_penalty=0.5, logprobs=0),
    SamplingParams(temperature=1.2, top_p=0.9, frequency_penalty=0.3, logprobs=5),
    SamplingParams(temperature=0.7, min_p=0.05, repetition_penalty=0.9),
    SamplingParams(temperature=1.0, logprobs=3),
]


def test_batch_invariance_bit_exact():
    V, steps, B = 4096, 8, len(BATCH_PARAMS)
    lg = torch.Generator().manual_seed(99)
    step_logits = [torch.randn(B, V, generator=lg) * 2.0 for _ in range(steps)]
    prompts = [[(7 * i + j) % V for j in range(5 + i)] for i in range(B)]

    def run_rows(order):
        """Run the rows in `order` together for all steps; return per-row (tokens, logprobs, tops)."""
        gens = {i: torch.Generator().manual_seed(1000 + i) for i in order}
        outs = {i: [] for i in order}
        res = {i: ([], [], []) for i in order}
        sampler = Sampler()
        for s in range(steps):
            logits = step_logits[s][order].contiguous()
            o = sampler.sample(logits, [BATCH_PARAMS[i] for i in order], [prompts[i] for i in order],
                               [list(outs[i]) for i in order], [gens[i] for i in order])
            for j, i in enumerate(order):
                outs[i].append(o.token_ids[j])
                res[i][0].append(o.token_ids[j])
                res[i][1].append(o.logprobs[j])
                res[i][2].append(o.top_logprobs[j])
        return res

    alone = {}
    for i in range(B):
        alone.update(run_rows([i]))
    batched = run_rows(list(range(B)))
    permuted = run_rows([3, 0, 4, 2, 1])
    pair = run_rows([2, 4])
    for i in range(B):
        assert batched[i] == alone[i], f"row {i} differs in a batch"
        assert permuted[i] == alone[i], f"row {i} differs in a permuted batch"
    for i in (2, 4):
        assert pair[i] == alone[i]
    # the sampled rows really sample (not all the same token)
    assert len(set(alone[4][0])) > 1


def test_batch_invariance_duplicate_rows():
    # identical logits and params in several rows, with different seeds: each row equals its solo run
    V = 2000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(top_p=0.9, top_k=50)
    solo = [run(logits, p, gens=[torch.Generator().manual_seed(s)]).token_ids[0] for s in range(6)]
    batch = run(logits.expand(6, -1).contiguous(), p, gens=[torch.Generator().manual_seed(s) for s in range(6)])
    assert batch.token_ids == solo


# ---------------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------------

def test_logprobs_are_raw_distribution():
    V = 64
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 3
    params = [SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=3),
              SamplingParams(temperature=0, presence_penalty=1.0, logprobs=0),
              SamplingParams(logprobs=None),
              SamplingParams(temperature=2.0, top_p=0.5, logprobs=20)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = run(logits, params, prompts=[[1, 2]] * 4, outputs=[[3, 4]] * 4, gens=gens)
    assert isinstance(out, SamplerOutput)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, p in enumerate(params):
        t = out.token_ids[i]
        if p.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(ref[i, t].item(), abs=1e-5)
        if p.logprobs == 0:
            assert out.top_logprobs[i] is None
            continue
        top = out.top_logprobs[i]
        exp_ids = sorted(range(V), key=lambda v: -ref[i, v].item())[: p.logprobs]
        assert [tid for tid, _ in top] == exp_ids
        assert [v for _, v in top] == pytest.approx([ref[i, v].item() for v in exp_ids], abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_logprobs_fast_path():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    out = run(logits, SamplingParams(temperature=0, logprobs=2))
    ref = softmax_ref([0.0, 2.0, 1.0])
    assert out.token_ids == [1]
    assert out.logprobs[0] == pytest.approx(math.log(ref[1]), abs=1e-6)
    assert [t for t, _ in out.top_logprobs[0]] == [1, 2]
    assert out.top_logprobs[0][1][1] == pytest.approx(math.log(ref[2]), abs=1e-6)


def test_empty_batch_and_shape_checks():
    out = Sampler().sample(torch.zeros(0, 10), [], [], [], [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(10), [SamplingParams()], [[]], [[]], [None])
    with pytest.raises(ValueError):
        Sampler().sample(torch.zeros(2, 10), [SamplingParams()], [[]], [[]], [None])
