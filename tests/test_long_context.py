"""Long prompts: chunked prefill over many chunks and KV windows equals the one-shot forward, memory held
per request stays bounded, the pool and the benchmark's memory formulas add up, prefill progress."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hylm.model.attention as attention
from hylm.config import ModelConfig, preset
from hylm.engine.engine import EngineConfig, LLMEngine
from hylm.engine.prefix_cache import PrefixCache
from hylm.engine.sampling_params import SamplingParams
from hylm.engine.state_pool import StatePool, plan_pool
from hylm.model import Batch

from engine_models import TINY, random_prompts, tiny_model

ROOT = Path(__file__).resolve().parents[1]
MTP = TINY.replace(num_nextn_predict_layers=1, mtp_pattern="*E")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "benchmarks" / "long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def chunked_logits(model, ids: list[list[int]], chunk: int, block_size: int = 4) -> list[torch.Tensor]:
    """Every position's logits, computed through a StatePool chunk by chunk with the sequences' chunks
    packed into the same forwards (so their KV blocks interleave in the pool)."""
    sizes = plan_pool(model.config, max_num_seqs=len(ids), max_model_len=max(map(len, ids)), block_size=block_size)
    pool = StatePool(model.config, sizes)
    slots = [pool.allocate_slot() for _ in ids]
    out: list[list[torch.Tensor]] = [[] for _ in ids]
    done = [0] * len(ids)
    with torch.inference_mode():
        while any(d < len(s) for d, s in zip(done, ids)):
            live = [i for i, s in enumerate(ids) if done[i] < len(s)]
            lens = [min(chunk, len(ids[i]) - done[i]) for i in live]
            for i, n in zip(live, lens):
                assert pool.reserve(slots[i], done[i] + n)
            tokens = torch.tensor([t for i, n in zip(live, lens) for t in ids[i][done[i]: done[i] + n]])
            batch = Batch(lens, [done[i] for i in live], [slots[i] for i in live])
            logits = model.forward_packed(tokens, batch, pool)  # [sum(lens), V]
            for j, (i, n) in enumerate(zip(live, lens)):
                out[i].append(logits[batch.offsets[j]: batch.offsets[j + 1]])
                done[i] += n
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize("fused", [True, False])
def test_many_chunks_and_windows_equal_one_shot(model, monkeypatch, fused):
    """Prompts of ~300 tokens in chunks of 23 with KV windows of 16 (many windows per chunk, a window
    boundary inside most blocks), two sequences interleaving their blocks (the gathered-copy read path)
    and one alone (the zero-copy view path): every position's logits equal the unchunked forward's."""
    ids = random_prompts(3, 250, 330, seed=11)
    with torch.no_grad():
        ref = [model(torch.tensor([s]))[0] for s in ids]  # [T, V] each, no cache at all
    monkeypatch.setattr(attention, "KV_WINDOW", 16)
    if not fused:  # the matmul fallback, used off the CPU
        monkeypatch.setattr(attention, "_FLASH_CPU", None)
    together = chunked_logits(model, ids[:2], chunk=23)
    alone = chunked_logits(model, ids[2:], chunk=23)
    for got, want in zip(together + alone, ref):
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-5


def test_engine_chunked_prefill_matches_one_step(model, monkeypatch):
    """The engine prefilling a long prompt in many small steps gives the same tokens and logprobs as
    one step over the whole prompt, and its first token is the unchunked forward's argmax."""
    prompt = random_prompts(1, 600, 600, seed=12)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)

    def run(chunk: int):
        eng = LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=640, max_num_batched_tokens=chunk))
        eng.add_request(prompt, params)
        toks, lps = [], []
        while eng.has_unfinished():
            for o in eng.step():
                toks += o.new_token_ids
                lps += o.new_logprobs
        return toks, lps

    one_shot = run(1024)
    monkeypatch.setattr(attention, "KV_WINDOW", 64)
    chunked = run(37)
    assert chunked[0] == one_shot[0]
    assert max(abs(a - b) for a, b in zip(chunked[1], one_shot[1])) < 1e-4
    with torch.no_grad():
        assert one_shot[0][0] == int(model(torch.tensor([prompt]))[0, -1].argmax())


def test_attention_reads_bounded_windows(model, monkeypatch):
    """However long the context, no read of the KV is longer than a window: continuation chunks and
    decode steps never gather the whole context (kv_append, which returns everything, is used for
    first chunks only). The PyTorch paths; the native decode kernel reads the cache in place."""
    monkeypatch.setattr(attention, "KV_WINDOW", 32)
    monkeypatch.setattr(attention, "native_decode_enabled", False)
    reads, appends = [], []
    orig_read, orig_append = StatePool.kv_read, StatePool.kv_append

    def kv_read(self, layer, slot, lo, hi):
        if not appends or appends[-1] is not None:  # not kv_append's own read, counted there
            reads.append(hi - lo)
        return orig_read(self, layer, slot, lo, hi)

    def kv_append(self, layer, slot, start, k, v):
        appends.append(None)
        out = orig_append(self, layer, slot, start, k, v)
        appends[-1] = start + k.shape[0]
        return out

    monkeypatch.setattr(StatePool, "kv_read", kv_read)
    monkeypatch.setattr(StatePool, "kv_append", kv_append)
    eng = LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=520, max_num_batched_tokens=50))
    eng.add_request(random_prompts(1, 500, 500, seed=13)[0], SamplingParams(temperature=0.0, max_tokens=8,
                                                                              ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert reads and max(reads) <= 32
    assert sum(reads) >= 2 * 500 * 10  # every attention layer read its whole context at every later step
    assert appends and max(appends) <= 50


def test_kv_read_is_a_view_for_consecutive_blocks_and_follows_replaced_tables():
    cfg = TINY
    pool = StatePool(cfg, plan_pool(cfg, max_num_seqs=2, max_model_len=64, block_size=4))
    layer = cfg.layer_indices("*")[0]
    a = pool.allocate_slot()
    assert pool.reserve(a, 20)
    kv = torch.randn(20, cfg.num_key_value_heads, cfg.head_dim)
    pool.kv_write(layer, a, 0, kv, -kv)
    keys, values = pool.kv_read(layer, a, 3, 18)
    assert torch.equal(keys, kv[3:18]) and torch.equal(values, -kv[3:18])
    assert keys.untyped_storage().data_ptr() == pool.k[layer].untyped_storage().data_ptr()  # no copy
    # a table replaced wholesale (as a worker process does each step) with blocks out of order
    table = list(pool.block_tables[a])
    pool.block_tables[a] = table[::-1]
    pool.kv_write(layer, a, 0, kv, -kv)
    keys, values = pool.kv_read(layer, a, 0, 20)
    assert torch.equal(keys, kv) and torch.equal(values, -kv)
    assert keys.untyped_storage().data_ptr() != pool.k[layer].untyped_storage().data_ptr()  # gathered
    for i, block in enumerate(table[::-1]):  # and the data went where the new table says
        assert torch.equal(pool.k[layer][:, 4 * block: 4 * block + 4], kv[4 * i: 4 * i + 4].transpose(0, 1))


def test_speculating_prefill_keeps_one_hidden_state():
    """A speculating request used to keep the target's hidden state of every prompt position until its
    first draft (O(prompt x hidden)); now the MTP catches up after each chunk and one row is left."""
    m = tiny_model(seed=6, config=MTP)
    prompt = random_prompts(1, 400, 400, seed=14)[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = LLMEngine(m, EngineConfig(max_num_seqs=1, max_model_len=420, max_num_batched_tokens=30))
    plain.add_request(prompt, params)
    eng = LLMEngine(m, EngineConfig(max_num_seqs=1, max_model_len=420, max_num_batched_tokens=30,
                                    speculative_tokens=2))
    rid = eng.add_request(prompt, params)
    req = eng.requests[rid]
    want, got, kept = [], [], []
    while plain.has_unfinished():
        want += [t for o in plain.step() for t in o.new_token_ids]
    while eng.has_unfinished():
        got += [t for o in eng.step() for t in o.new_token_ids]
        kept.append(sum(h.shape[0] for h in req.mtp_hidden))
        assert req.num_computed - req.mtp_computed == kept[-1] or req.finished
    assert got == want
    assert len(kept) > 10 and max(kept) <= 1 + 2  # one position, or a verification's accepted rows
    assert eng.metrics.spec_steps > 0


def test_prefill_progress_reports():
    m = tiny_model(seed=7)
    eng = LLMEngine(m, EngineConfig(max_num_seqs=2, max_model_len=400, max_num_batched_tokens=64))
    calls: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    prompts = random_prompts(2, 150, 300, seed=15)
    for name, p in zip("ab", prompts):
        eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), request_id=name,
                        on_prefill=lambda done, total, name=name: calls[name].append((done, total)))
    while eng.has_unfinished():
        eng.step()
    for name, p in zip("ab", prompts):
        done = [d for d, _ in calls[name]]
        assert all(t == len(p) for _, t in calls[name])
        assert done == sorted(set(done)) and done[-1] == len(p)  # strictly increasing, ending at the prompt
        assert len(done) >= math.ceil(len(p) / 64)  # one report per step that computed part of it, no more
        assert len(done) <= math.ceil(len(p) / 64) + 2


def test_generate_progress_bar(tmp_path):
    from hylm.weights import save_hf_checkpoint

    save_hf_checkpoint(tiny_model(seed=8), tmp_path)
    ids = ",".join(str(t) for t in random_prompts(1, 2500, 2500, seed=16)[0])
    r = subprocess.run([sys.executable, "-m", "hylm.cli", "generate", str(tmp_path), "--prompt-ids", ids,
                        "--max-tokens", "3", "--max-model-len", "2600", "--progress"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 3
    assert "prefill" in r.stderr and "2.50k/2.50k" in r.stderr
    quiet = subprocess.run([sys.executable, "-m", "hylm.cli", "generate", str(tmp_path), "--prompt-ids", ids,
                            "--max-tokens", "3", "--max-model-len", "2600", "--no-progress"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "prefill" not in quiet.stderr
    assert quiet.stdout.split() == r.stdout.split()


def test_pool_for_a_million_tokens():
    """Super at max_model_len 1M (one sequence, bf16): 8 GiB of KV in 65536 blocks of 16, plus one slot of
    fp32 SSM state (40 layers x 128 x 64 x 128 x 4 B = 160 MiB) and bf16 conv windows (3 x 10240 x 2 B)."""
    cfg = preset("nemotron-3-super-120b-a12b")
    sizes = plan_pool(cfg, max_num_seqs=1, max_model_len=1 << 20, block_size=16, dtype=torch.bfloat16)
    assert (sizes.num_slots, sizes.num_blocks, sizes.max_model_len) == (1, 65536, 1 << 20)
    assert sizes.block_bytes == 16 * 8 * 2 * 2 * 128 * 2
    assert sizes.num_blocks * sizes.block_bytes == 8 << 30
    assert sizes.slot_bytes == 40 * (128 * 64 * 128 * 4 + 3 * (8192 + 2 * 8 * 128) * 2) == (160 << 20) + 2457600


def test_benchmark_memory_formulas():
    bench = load_benchmark()
    cfg = ModelConfig(**bench.SUPER_MINI)
    # Super's proportions: 40/40/8 of 88 layers -> 10/10/2 of 22
    assert (cfg.pattern.count("M"), cfg.pattern.count("E"), cfg.pattern.count("*"), len(cfg.pattern)) == (10, 10, 2, 22)
    mem = bench.memory_terms(cfg)
    assert mem["kv_per_token"] == 2 * 2 * 2 * 64 * 4  # 2 attention layers x (K, V) x 2 KV heads x 64 x fp32
    ssm, conv = 8 * 64 * 128 * 4, 3 * (8 * 64 + 2 * 8 * 128) * 4  # per Mamba layer
    assert mem["states"] == 10 * (ssm + conv) == 2928640
    # predicted RSS at 1M with 100 MiB of weights and a 400 MiB constant: 0.1 + 2 + 0.0027 + 0.39 GiB
    assert bench.predicted_rss(cfg, 100 << 20, 1 << 20, 400 << 20) == (100 << 20) + (2 << 30) + 2928640 + (400 << 20)
    # decode reads weights, every K and V, and the states twice (read, then written back)
    assert bench.decode_bytes(cfg, 10 << 20, 1000) == (10 << 20) + 1000 * 2048 + 2 * 2928640
    assert [bench.parse_tokens(x) for x in ("4K", "1M", "3000", "512k")] == [4096, 1 << 20, 3000, 512 << 10]
    # attention FLOPs dominate a 1M prefill: 2 layers x 4 x 4 heads x 64 x T^2 / 2
    t = 1 << 20
    quad = bench.prefill_flops(cfg, 10 << 20, t) - 1024 * bench.prefill_flops(cfg, 10 << 20, t // 1024)
    assert quad == pytest.approx(2 * 4 * 4 * 64 * (t * t - t * t / 1024) / 2, rel=1e-9)


def test_prefix_cache_checkpoints_grow_logarithmically():
    """Long-prompt checkpoints: every interval for the first 16 intervals, then half as many per doubling
    (each one hashes and copies its whole prefix: O(T) in all, not O(T^2))."""
    cfg = TINY
    pool = StatePool(cfg, plan_pool(cfg, max_num_seqs=1, max_model_len=64, block_size=16))
    cache = PrefixCache(pool, 1 << 20, interval_blocks=16)  # interval 256 tokens
    marks = cache.checkpoint_positions(1 << 20, 0, 1 << 20)
    assert marks[:16] == [256 * i for i in range(1, 17)]
    assert marks[16:20] == [4096 + 512 * i for i in range(1, 5)]
    assert len(marks) == 16 + 8 * 8 and marks[-1] == 1 << 20
    # the same marks whatever the chunking, and the prompt's end always included
    pieces = [m for s in range(0, 1 << 20, 1000) for m in cache.checkpoint_positions(1 << 20, s, min(s + 1000, 1 << 20))]
    assert pieces == marks
    assert cache.checkpoint_positions(5000, 4096, 6000) == [4608, 5000]
