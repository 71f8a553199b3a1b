"""The engine enforces a thinking budget given as token-level rules."""

import pytest
import torch

from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.sampling_params import SamplingParams, ThinkingBudget

from engine_models import random_prompts, tiny_model

END_MARKER = 13  # "</think>"
CLOSE = (13, 10)  # forced close sequence: "</think>" then a newline-like token


@pytest.fixture(scope="module")
def rambler():
    """A model that (practically) never closes its reasoning on its own: its </think> logit is always 0
    while the other logits spread with std ~3.6, so </think> has probability ~1e-5 per token."""
    m = tiny_model(seed=4)
    with torch.no_grad():
        m.lm_head.weight[END_MARKER] = 0.0
    return m


def generate(model, prompt, params):
    eng = LLMEngine(model, EngineConfig())
    eng.add_request(prompt, params)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            out = o
    return out


def sampling(budget=None, newlines=frozenset(), grace=8, temperature=0.0, seed=None, max_tokens=60):
    tb = None if budget is None else ThinkingBudget(budget, CLOSE, END_MARKER, frozenset(newlines), grace)
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, ignore_eos=True, thinking_budget=tb)


@pytest.mark.parametrize("budget", [0, 1, 5, 17])
def test_budget_plus_grace_bounds_reasoning_and_answer_follows(rambler, budget):
    prompt = random_prompts(1, 10, 10, seed=budget)[0]
    free = generate(rambler, prompt, sampling()).output_ids
    assert END_MARKER not in free  # without a budget it rambles to max_tokens
    out = generate(rambler, prompt, sampling(budget=budget, grace=8)).output_ids
    end = out.index(END_MARKER)
    assert budget <= end <= budget + 8
    assert out[end: end + 2] == list(CLOSE)
    assert len(out) == 60 and len(out) - end - 2 > 10  # the answer continues after the reasoning
    assert out[:end] == free[:end]  # the reasoning itself is untouched


def test_closes_at_first_newline_after_budget(rambler):
    prompt = random_prompts(1, 10, 10, seed=1)[0]
    free = generate(rambler, prompt, sampling(temperature=1.0, seed=3)).output_ids
    budget = 6
    newline = free[budget + 2]  # declare the token sampled 3 tokens after the budget a "newline"
    first_nl = next(i for i in range(budget - 1, len(free)) if free[i] == newline)
    out = generate(rambler, prompt, sampling(budget=budget, newlines={newline}, grace=20, temperature=1.0,
                                              seed=3)).output_ids
    assert out[: first_nl + 1] == free[: first_nl + 1]
    assert out[first_nl + 1: first_nl + 3] == list(CLOSE)


def test_model_closing_itself_stops_counting(rambler):
    """If the model emits </think> within budget, nothing is forced afterwards."""
    prompt = random_prompts(1, 10, 10, seed=2)[0]
    free = generate(rambler, prompt, sampling()).output_ids
    marker = free[3]  # pretend this token is </think>
    tb = ThinkingBudget(8, CLOSE, marker, frozenset(), 2)
    out = generate(rambler, prompt, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True,
                                                    thinking_budget=tb)).output_ids
    assert out == free


def test_max_tokens_still_bounds_everything(rambler):
    prompt = random_prompts(1, 10, 10, seed=5)[0]
    out = generate(rambler, prompt, sampling(budget=5, grace=3, max_tokens=7))
    assert len(out.output_ids) == 7 and out.finish_reason == "length"


def test_budget_validation():
    with pytest.raises(ValueError, match="reasoning_budget"):
        ThinkingBudget(-1, CLOSE, END_MARKER)
