"""The background-thread engine: concurrent streams, aborts free state at once, errors reach the caller."""

import asyncio

import pytest

from hylm.engine.async_engine import AsyncEngine, QueueFull
from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.sampling_params import SamplingParams
from hylm.engine.scheduler import RequestTooLong

from engine_models import random_prompts, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_concurrent_streams_match_offline(model):
    prompts = random_prompts(6, 3, 20, seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref_engine = LLMEngine(model, EngineConfig())
    ref = {}
    for i, p in enumerate(prompts):
        ref_engine.add_request(p, params, f"r{i}")
    while ref_engine.has_unfinished():
        for o in ref_engine.step():
            if o.finished:
                ref[o.request_id] = o.output_ids
    eng = AsyncEngine(LLMEngine(model, EngineConfig(max_num_seqs=3)))

    async def one(i, p):
        toks = []
        async for out in eng.generate(f"r{i}", p, params):
            toks += out.new_token_ids
        return toks

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    got = asyncio.run(main())
    assert got == [ref[f"r{i}"] for i in range(6)]
    eng.shutdown()


def test_early_exit_aborts_and_frees(model):
    eng = AsyncEngine(LLMEngine(model, EngineConfig(max_num_seqs=2)))

    async def main():
        gen = eng.generate("a", [5, 6, 7], SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
        await asyncio.sleep(0.3)

    asyncio.run(main())
    pool = eng.engine.pool
    assert pool.num_free_slots == 2 and pool.num_free_blocks == eng.engine.sizes.num_blocks
    assert not eng.engine.has_unfinished()
    eng.shutdown()


def test_bad_request_raises_and_queue_limit(model):
    eng = AsyncEngine(LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=1024)), max_waiting=1)

    async def consume(rid, prompt, params):
        return [o async for o in eng.generate(rid, prompt, params)]

    async def main():
        with pytest.raises(RequestTooLong):
            await consume("x", list(range(3, 60)), SamplingParams(max_tokens=1000))
        long = SamplingParams(max_tokens=600, ignore_eos=True)
        t1 = asyncio.create_task(consume("1", [5, 6], long))
        while not eng.engine.scheduler.running:  # "1" holds the only slot
            await asyncio.sleep(0.01)
        t2 = asyncio.create_task(consume("2", [5, 6], long))
        while not eng.engine.scheduler.waiting:  # "2" fills the queue
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await consume("3", [5, 6], long)
        await asyncio.gather(t1, t2)

    asyncio.run(main())
    assert eng.engine.pool.num_free_slots == 1
    eng.shutdown()
