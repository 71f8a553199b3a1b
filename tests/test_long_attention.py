"""Windowed attention over long contexts (online softmax, bounded memory) equals the dense path."""

import pytest
import torch

import hylm.model.attention as attention
from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.sampling_params import SamplingParams

from engine_models import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def test_windowed_equals_dense_through_cache(model, monkeypatch):
    ids = torch.tensor(random_prompts(1, 300, 300, seed=1))
    with torch.no_grad():
        dense = model(ids)
        steps = [ids[:, :100], ids[:, 100:101], ids[:, 101:237], ids[:, 237:]]
        monkeypatch.setattr(attention, "KV_WINDOW", 7)  # many windows per chunk
        cache = model.new_cache(1)
        windowed = torch.cat([model(s, cache=cache) for s in steps], 1)
    assert ((windowed - dense).abs().max() / dense.abs().max()) < 1e-5


def test_windowed_engine_outputs_and_logprobs(model, monkeypatch):
    prompts = random_prompts(3, 150, 400, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)

    def run():
        eng = LLMEngine(model, EngineConfig(max_num_batched_tokens=97, block_size=16, max_model_len=512))
        ids = [eng.add_request(p, params) for p in prompts]
        res = {}
        while eng.has_unfinished():
            for o in eng.step():
                res.setdefault(o.request_id, [[], []])
                res[o.request_id][0] += o.new_token_ids
                res[o.request_id][1] += o.new_logprobs
        return [res[i] for i in ids]

    dense = run()
    monkeypatch.setattr(attention, "KV_WINDOW", 40)
    windowed = run()
    for (td, ld), (tw, lw) in zip(dense, windowed):
        assert td == tw
        assert max(abs(a - b) for a, b in zip(ld, lw)) < 1e-4


@pytest.mark.parametrize("chunks", [[100, 4, 5, 1, 3], [60, 2, 2, 7]])
def test_masked_single_call_equals_windows_and_merge(model, monkeypatch, chunks):
    """A few new tokens over a short context take one masked kernel call; it equals the past-window +
    causal-window + merge path and the uncached forward."""
    ids = torch.tensor(random_prompts(1, sum(chunks), sum(chunks), seed=4))
    bounds = [0]
    for c in chunks:
        bounds.append(bounds[-1] + c)

    def chunked():
        cache = model.new_cache(1)
        with torch.no_grad():
            return torch.cat([model(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])], 1)

    with torch.no_grad():
        dense = model(ids)
    calls = []
    original = attention.Attention._window
    monkeypatch.setattr(attention.Attention, "_window",
                        lambda self, *a, **k: calls.append(k.get("mask") is not None) or original(self, *a, **k))
    masked = chunked()
    assert any(calls)  # the masked call ran
    monkeypatch.setattr(attention, "MASKED_CALL_MAX", 0)
    calls.clear()
    merged = chunked()
    assert not any(calls)
    for got in (masked, merged):
        assert ((got - dense).abs().max() / dense.abs().max()) < 1e-5
    assert ((masked - merged).abs().max() / dense.abs().max()) < 1e-5
